"""The Open Inference Protocol (KServe v2 REST) on a real server in a child process, called
through the real ``tritonclient.http`` client: metadata that matches the Triton repository's
config.pbtxt, readiness, inference that equals the ONNX file's own outputs (JSON and binary
tensors, batches), requested outputs, the shared concurrency gate, and malformed requests
answered 4xx with the server still serving."""
from __future__ import annotations

import ast
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402  (a dependency of tritonclient)
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import run_python  # noqa: E402
from serve.inference_protocol import MAX_BATCH  # noqa: E402
from serve.launch import running_app  # noqa: E402
from serve.predictor import Predictor, create_session  # noqa: E402
from test_http_api import slow_png  # noqa: E402
from test_readme import an_example, readme_block  # noqa: E402

OUTPUTS = ("logits", "probabilities", "heatmaps")


def manifest(models: Path) -> dict:
    return json.loads((models / "manifest.json").read_text())


@pytest.fixture(scope="module")
def client(app_url):
    connection = httpclient.InferenceServerClient(app_url.removeprefix("http://"), network_timeout=120)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as session:
        yield session


@pytest.fixture(scope="module")
def size(exported_models) -> tuple[int, int]:
    return tuple(manifest(exported_models)["models"][0]["preprocessing"]["input_size"][1:])


def batch(n: int, size, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, *size)).astype(dtype)


def image_input(x: np.ndarray, binary: bool = True, datatype: str = "FP32"):
    tensor = httpclient.InferInput("image", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def onnx_outputs(models: Path, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The ONNX file's own outputs for ``x``, from a session made as the server makes its own."""
    session = create_session(models / f"{name}.onnx")
    return dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"image": x})))


def assert_serving(client, size):
    """The server is alive and still answers an inference."""
    assert client.is_server_live()
    result = client.infer("resnet34", [image_input(batch(1, size))])
    assert result.as_numpy("probabilities").shape[0] == 1


def test_server_metadata_and_health(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "resnet-trio" and metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_is_the_triton_repositorys(client, exported_models, tmp_path):
    from export import triton

    folders = triton.write_repository(exported_models, tmp_path / "repo")
    assert [f.name for f in folders] == [triton.model_name(Path(e["file"]))
                                          for e in manifest(exported_models)["models"]]
    for folder in folders:
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        metadata = client.get_model_metadata(folder.name)
        assert metadata["name"] == config.name == folder.name
        assert metadata["versions"] == [p.name for p in folder.iterdir() if p.is_dir()] == ["1"]
        assert metadata["platform"] == config.platform
        for served, configured in ((metadata["inputs"], config.input), (metadata["outputs"], config.output)):
            assert [t["name"] for t in served] == [t.name for t in configured]
            for tensor, declared in zip(served, configured):
                assert "TYPE_" + tensor["datatype"] == model_config_pb2.DataType.Name(declared.data_type)
                # Triton's metadata puts the batch dimension (-1) before config.pbtxt's dims.
                assert tensor["shape"] == [-1, *declared.dims]
    assert [t["name"] for t in client.get_model_metadata("resnet34")["outputs"]] == list(OUTPUTS)
    assert client.get_model_metadata("resnet34", "1") == client.get_model_metadata("resnet34")


def test_model_readiness(client):
    assert client.is_model_ready("resnet34") and client.is_model_ready("plain34", "1")
    assert not client.is_model_ready("resnet50")
    assert not client.is_model_ready("resnet34", "2")
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("resnet50")
    assert unknown.value.status() == "404" and "resnet34" in unknown.value.message()


def test_not_ready_while_the_service_is_not(exported_models):
    """Once shutdown begins (or a request is past its deadline) readiness is 4xx, liveness 200."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve.catalog import load_catalog
    from serve.gate import Gate
    from serve.inference_protocol import create_router
    from serve.service import Service

    service = Service(load_catalog(exported_models), Gate(1, 1))
    app = FastAPI()
    app.include_router(create_router(service))
    with TestClient(app) as local:
        assert local.get("/v2/health/ready").json() == {"ready": True}
        assert local.get("/v2/models/resnet34/ready").json() == {"name": "resnet34", "ready": True}
        service.draining = True
        assert local.get("/v2/health/live").status_code == 200
        assert local.get("/v2/health/ready").status_code == 400
        assert local.get("/v2/models/resnet34/ready").status_code == 400


@pytest.mark.parametrize("name", ["plain34", "resnet34", "resnet34_modified"])
def test_json_inference_equals_the_onnx_files_outputs(client, exported_models, size, name):
    x = batch(3, size, seed=1)
    outputs = [httpclient.InferRequestedOutput(o, binary_data=False) for o in OUTPUTS]
    result = client.infer(name, [image_input(x, binary=False)], outputs=outputs, request_id="r-7")
    response = result.get_response()
    assert response["model_name"] == name and response["model_version"] == "1" and response["id"] == "r-7"
    assert all("data" in o and "parameters" not in o for o in response["outputs"])  # JSON, not binary
    expected = onnx_outputs(exported_models, name, x)
    for output in OUTPUTS:
        np.testing.assert_array_equal(result.as_numpy(output), expected[output])


def test_binary_tensors_are_the_clients_default(client, exported_models, size):
    x = batch(MAX_BATCH, size, seed=2)
    result = client.infer("resnet34_modified", [image_input(x)])  # binary in, binary out
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == list(OUTPUTS)
    assert all(o["parameters"]["binary_data_size"] > 0 and "data" not in o for o in response["outputs"])
    expected = onnx_outputs(exported_models, "resnet34_modified", x)
    for output in OUTPUTS:
        got = result.as_numpy(output)
        assert got.shape[0] == MAX_BATCH
        np.testing.assert_array_equal(got, expected[output])


def test_requested_outputs_only(client, exported_models, size):
    x = batch(2, size, seed=3)
    result = client.infer("plain34", [image_input(x)], model_version="1",
                          outputs=[httpclient.InferRequestedOutput("probabilities")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("heatmaps") is None
    np.testing.assert_array_equal(result.as_numpy("probabilities"),
                                  onnx_outputs(exported_models, "plain34", x)["probabilities"])


def assert_refused(call, status: str, *words):
    with pytest.raises(InferenceServerException) as refused:
        call()
    assert refused.value.status() == status, refused.value
    for word in words:
        assert word in refused.value.message()


def test_malformed_requests_through_the_client(client, size):
    h, w = size
    assert_refused(lambda: client.infer("resnet34", [image_input(batch(1, (h + 1, w)))]),
                   "400", "shape")
    assert_refused(lambda: client.infer("resnet34", [image_input(np.zeros((1, 3, h * w), np.float32))]),
                   "400", "shape")
    assert_refused(lambda: client.infer("resnet34", [image_input(batch(1, size, dtype=np.float64),
                                                                 datatype="FP64")]),
                   "400", "datatype", "FP32")
    assert_refused(lambda: client.infer("resnet34", [image_input(batch(MAX_BATCH + 1, size))]),
                   "400", "batch", str(MAX_BATCH))
    assert_refused(lambda: client.infer("resnet50", [image_input(batch(1, size))]), "404", "unknown model")
    assert_refused(lambda: client.infer("resnet34", [image_input(batch(1, size))], model_version="2"),
                   "404", "version")
    assert_refused(lambda: client.infer("resnet34", [image_input(batch(1, size))],
                                        outputs=[httpclient.InferRequestedOutput("features")]),
                   "400", "unknown output")
    assert_refused(lambda: client.infer("resnet34", [image_input(batch(1, size))],
                                        outputs=[httpclient.InferRequestedOutput("probabilities", class_count=2)]),
                   "400", "classification")
    wrong_name = httpclient.InferInput("input", [1, 3, h, w], "FP32")
    wrong_name.set_data_from_numpy(batch(1, size))
    assert_refused(lambda: client.infer("resnet34", [wrong_name]), "400", "unknown input")
    assert_serving(client, size)


def json_request(size, n=1, **tensor):
    h, w = size
    return {"inputs": [{"name": "image", "shape": [n, 3, h, w], "datatype": "FP32",
                        "data": [0.5] * (n * 3 * h * w), **tensor}]}


def assert_error(response, status: int, *words):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message


def test_malformed_bodies(http, client, size):
    url = "/v2/models/resnet34/infer"
    h, w = size
    values = 3 * h * w
    assert http.post(url, json=json_request(size)).status_code == 200  # the well-formed request
    assert_error(http.post(url, content=b"{not json"), 400, "JSON")
    assert_error(http.post(url, content=b"[" * 100_000), 400, "JSON")
    assert_error(http.post(url, json=[1, 2]), 400, "object")
    assert_error(http.post(url, json={"inputs": []}), 400, "image")
    assert_error(http.post(url, json={"inputs": [{"name": ["image"]}]}), 400, "unknown input")
    assert_error(http.post(url, json={**json_request(size), "outputs": [{"name": {}}]}), 400, "unknown output")
    assert_error(http.post(url, json=json_request(size, data=["0.5"] * values)), 400, "numbers")
    assert_error(http.post(url, json=json_request(size, data=[[0.5, 0.5], [0.5]])), 400, "numbers")
    assert_error(http.post(url, json=json_request(size, data=[0.5] * (values - 1))), 400, "values")
    assert_error(http.post(url, json=json_request(size, shape=[0, 3, h, w], data=[])), 400, "shape")
    assert_error(http.post(url, json=json_request(size, shape="1,3")), 400, "shape")
    nan = json.dumps(json_request(size)).replace("0.5", "NaN", 1)
    assert_error(http.post(url, content=nan), 400, "NaN")
    assert_error(http.post(url, json={**json_request(size), "id": 5}), 400, "id")
    assert_error(http.post(url, json=json_request(size, parameters={"shared_memory_region": "x"})),
                 400, "shared-memory")

    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, h, w], "datatype": "FP32",
                                     "parameters": {"binary_data_size": values * 4}}]}).encode()
    data = np.zeros(values, np.float32).tobytes()
    binary = {"Inference-Header-Content-Length": str(len(header))}
    assert http.post(url, content=header + data, headers=binary).status_code == 200
    assert_error(http.post(url, content=header + data[:-4], headers=binary), 400, "ends before")
    assert_error(http.post(url, content=header + data + b"\0", headers=binary), 400, "after")
    assert_error(http.post(url, content=header + data, headers={"Inference-Header-Content-Length": "-1"}),
                 400, "Inference-Header-Content-Length")
    assert_error(http.post(url, content=header + data,
                           headers={"Inference-Header-Content-Length": str(len(header) + len(data) + 1)}),
                 400, "Inference-Header-Content-Length")
    as_float = header.replace(str(values * 4).encode(), f"{values * 4}.0".encode())
    assert_error(http.post(url, content=as_float + data, headers={"Inference-Header-Content-Length": str(len(as_float))}),
                 400, "binary_data_size")
    short = header.replace(str(values * 4).encode(), str(values * 4 - 4).encode())
    assert_error(http.post(url, content=short + data, headers={"Inference-Header-Content-Length": str(len(short))}),
                 400, "binary_data_size")
    assert_error(http.post(url, content=b"x", headers={"content-encoding": "gzip"}), 415, "compressed")
    assert_serving(client, size)


def test_bodies_above_the_limit_get_413(http, client, size):
    from serve.inference_protocol import Limits

    limit = Limits().body_bytes(3 * size[0] * size[1])
    assert_error(http.post("/v2/models/resnet34/infer", content=b" " * (limit + 1)), 413, "limit")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536
    assert_error(http.post("/v2/models/resnet34/infer", content=chunks()), 413, "limit")
    # A full batch in JSON, written out in full, fits.
    full = json_request(size, n=MAX_BATCH)
    full["inputs"][0]["data"] = batch(MAX_BATCH, size).ravel().astype(np.float64).tolist()
    assert len(json.dumps(full)) < limit
    assert http.post("/v2/models/resnet34/infer", json=full).status_code == 200
    assert_serving(client, size)


def test_inference_waits_in_the_same_line_as_the_other_doors(exported_models, tmp_path, size):
    """With one slot and one waiting place held by slow /api/v1/classify uploads, a protocol
    inference is turned away with 503 and Retry-After, as the plain API's requests are."""
    image = slow_png(tmp_path / "slow.png").read_bytes()
    seen, done = [], threading.Event()
    with running_app(exported_models, "--concurrency", "1", "--queue-size", "1") as url:
        def keep_busy():
            with httpx.Client(base_url=url, timeout=300) as session:
                while not done.is_set():
                    session.post("/api/v1/classify", content=image, headers={"content-type": "image/png"})
        busy = [threading.Thread(target=keep_busy) for _ in range(3)]
        for thread in busy:
            thread.start()
        try:
            with httpx.Client(base_url=url, timeout=300) as session:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not any(r.status_code == 503 for r in seen):
                    seen.append(session.post("/v2/models/resnet34/infer", json=json_request(size)))
                    time.sleep(0.02)
        finally:
            done.set()
            for thread in busy:
                thread.join()
    refused = [r for r in seen if r.status_code == 503]
    assert refused, sorted({r.status_code for r in seen})
    assert_error(refused[0], 503, "busy")
    assert int(refused[0].headers["retry-after"]) >= 1
    assert {r.status_code for r in seen} <= {200, 503}


def test_client_snippet_runs_as_printed(app_url, exported_models, tmp_path):
    """The documentation's tritonclient program, unchanged but for the URL, gets the ONNX file's
    probabilities for the photo."""
    shutil.copytree(exported_models, tmp_path / "models")
    shutil.copy(an_example(exported_models), tmp_path / "photo.jpg")
    code = readme_block("oip-client")
    assert '"127.0.0.1:7860"' in code
    (tmp_path / "client.py").write_text(code.replace('"127.0.0.1:7860"', repr(app_url.removeprefix("http://"))))
    # Only tritonclient, numpy and Pillow: the project's own packages are not on the path here.
    result = run_python(["client.py"], cwd=tmp_path, env={"PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    expected = Predictor(exported_models / "resnet34.onnx").predict_file(tmp_path / "photo.jpg")
    assert list(printed) == list(expected.probabilities)
    for name, p in expected.probabilities.items():
        assert abs(printed[name] - round(p, 3)) <= 0.0011  # printed rounded to 3 decimals

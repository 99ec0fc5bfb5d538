"""The plain HTTP API, called on a real server in a child process: /api/v1/classify (multipart
and raw body), /api/v1/models, /healthz, /readyz, the OpenAPI schema, every error status, and
the documentation's httpx example."""
from __future__ import annotations

import hashlib
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

import imaging
from serve.launch import running_app
from test_app import assert_matches_direct, classify, direct
from test_readme import run_client_snippet

MAX_UPLOAD = 50 * 1024 * 1024


def png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def example(models):
    return models / json.loads((models / "manifest.json").read_text())["examples"][0]


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as client:
        yield client


def test_classify_multipart_gives_the_pages_results(http, app_url, exported_models):
    path = example(exported_models)
    with open(path, "rb") as f:
        response = http.post("/api/v1/classify", files={"file": (path.name, f, "image/jpeg")})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    results = response.json()["results"]
    assert_matches_direct(results, direct(exported_models, imaging.load_rgb(path)))
    page = classify(app_url, path)  # the same fields as /classify, nothing more or less
    assert [set(r) for r in results] == [set(r) for r in page]
    assert [r["top_class"] for r in results] == [r["top_class"] for r in page]


def test_classify_raw_body(http, exported_models, tmp_path):
    path = tmp_path / "deep.png"
    ramp = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    response = http.post("/api/v1/classify", content=path.read_bytes(),
                         headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert_matches_direct(response.json()["results"], direct(exported_models, imaging.load_rgb(path)))


def test_models_lists_the_served_files(http, exported_models):
    response = http.get("/api/v1/models")
    assert response.status_code == 200
    models = response.json()["models"]
    manifest = json.loads((exported_models / "manifest.json").read_text())
    assert [m["name"] for m in models] == [e["name"] for e in manifest["models"]]
    for m, entry in zip(models, manifest["models"]):
        assert m["sha256"] == hashlib.sha256((exported_models / entry["file"]).read_bytes()).hexdigest()
        assert m["display_name"] == entry["display_name"] and m["precision"] == "fp32"
        assert m["class_names"] == entry["class_names"]
        assert m["input_size"] == entry["preprocessing"]["input_size"][1:]
        assert m["val_accuracy"] == pytest.approx(entry["val_accuracy"], abs=1e-6)


def test_health_and_readiness(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_openapi_schema_describes_the_routes(http):
    schema = http.get("/api/v1/openapi.json").json()
    assert {"/api/v1/classify", "/api/v1/models", "/healthz", "/readyz"} <= set(schema["paths"])
    classify_op = schema["paths"]["/api/v1/classify"]["post"]
    assert {"multipart/form-data", "image/png"} <= set(classify_op["requestBody"]["content"])
    assert {"200", "400", "413", "503"} <= set(classify_op["responses"])
    # The result schema is the service's own result model: every field a result carries.
    from serve.service import ModelResult

    fields = set(schema["components"]["schemas"]["ModelResult"]["properties"])
    assert fields == set(ModelResult.model_fields) and "heatmap" in fields
    for result in http.post("/api/v1/classify", files={"file": ("a.png", png_bytes())}).json()["results"]:
        assert set(result) <= fields


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"]
    assert "Traceback" not in response.text and all(w in body["error"] for w in words), body


@pytest.mark.parametrize("name, data, words", [
    ("notes.txt", b"not an image at all\n", ("Cannot classify this file", "not an image")),
    ("empty.png", b"", ("empty file",)),
    ("cut.jpg", None, ("unreadable image data",)),
])
def test_unusable_files_get_400_with_the_pages_message(http, exported_models, name, data, words):
    if data is None:
        data = example(exported_models).read_bytes()[:300]
    assert_error(http.post("/api/v1/classify", files={"file": (name, data)}), 400, *words)
    assert http.post("/api/v1/classify", files={"file": ("a.jpg", example(exported_models).read_bytes())}
                     ).status_code == 200  # still serving


def test_requests_that_are_not_an_image_upload(http):
    assert_error(http.post("/api/v1/classify", content=b"x", headers={"content-type": "text/plain"}),
                 415, "multipart field 'file'")
    assert_error(http.post("/api/v1/classify", data={"other": "x"}, files={"image": ("a.png", b"x")}),
                 400, "'file'")
    assert_error(http.post("/api/v1/classify", content=b"--x\r\nbroken",
                           headers={"content-type": "multipart/form-data; boundary=x"}), 400)


def test_uploads_above_the_limit_get_413(http):
    big = b"\0" * (MAX_UPLOAD + 1)
    assert_error(http.post("/api/v1/classify", content=big, headers={"content-type": "image/png"}),
                 413, "limit")

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(MAX_UPLOAD // (1 << 20) + 2):
            yield b"\0" * (1 << 20)
    assert_error(http.post("/api/v1/classify", content=chunks(), headers={"content-type": "image/png"}),
                 413, "limit")


def slow_png(path):
    """A 30-megapixel PNG of a few kB: a fraction of a second to decode, under the pixel limit."""
    Image.new("L", (6000, 5000), 90).save(path)
    return path


def test_a_full_line_gets_503_with_retry_after(exported_models, tmp_path):
    image = slow_png(tmp_path / "slow.png").read_bytes()
    statuses, lock = [], threading.Lock()
    with running_app(exported_models, "--concurrency", "1", "--queue-size", "1") as url:
        start = threading.Barrier(10)

        def one():
            with httpx.Client(base_url=url, timeout=300) as client:
                start.wait()
                response = client.post("/api/v1/classify", content=image,
                                       headers={"content-type": "image/png"})
            with lock:
                statuses.append(response)
        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = sorted(r.status_code for r in statuses)
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r in statuses:
        if r.status_code == 503:
            assert_error(r, 503, "busy")
            assert int(r.headers["retry-after"]) >= 1


def test_httpx_snippet_runs_as_printed(app_url, exported_models, tmp_path):
    lines = run_client_snippet("http-api-httpx", app_url, example(exported_models), tmp_path).strip().splitlines()
    assert [line.split()[0] for line in lines] == ["Plain-34", "ResNet-34", "ResNet-34-Modified"]

"""The Triton model repository: every config.pbtxt parsed with Triton's own ModelConfig schema
and checked against the ONNX file next to it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402  (a dependency of tritonclient)

from export import triton  # noqa: E402

DTYPES = {  # ONNX element type -> (Triton enum name, numpy dtype)
    onnx.TensorProto.FLOAT: ("TYPE_FP32", np.float32),
}


def parse_config(folder: Path):
    """Strict parse: an unknown field or a malformed value raises."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_model_folder(folder: Path, source_onnx: Path) -> None:
    config = parse_config(folder)
    model_file = folder / "1" / "model.onnx"
    assert sha256(model_file) == sha256(source_onnx), "the repository must hold the exported file unchanged"
    model = onnx.load(str(model_file))
    meta = {p.key: p.value for p in model.metadata_props}
    class_names = json.loads(meta["class_names"])

    assert config.name == folder.name
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size > 1
    assert config.HasField("dynamic_batching")
    enum = model_config_pb2.DataType

    graph_tensors = {"input": list(model.graph.input), "output": list(model.graph.output)}
    for kind, configured in (("input", config.input), ("output", config.output)):
        expected = graph_tensors[kind]
        assert [t.name for t in configured] == [v.name for v in expected]
        for tensor, value in zip(configured, expected):
            onnx_type = value.type.tensor_type
            assert enum.Name(tensor.data_type) == DTYPES[onnx_type.elem_type][0]
            batch, *rest = onnx_type.shape.dim
            assert batch.dim_param and not batch.HasField("dim_value"), "batch must be dynamic in ONNX"
            # With max_batch_size > 0, Triton's dims leave out the batch dimension.
            assert list(tensor.dims) == [d.dim_value for d in rest]

    image = config.input[0]
    assert list(image.dims) == json.loads(meta["input_size"])  # [3, H, W]
    by_name = {t.name: t for t in config.output}
    assert list(by_name["probabilities"].dims) == [len(class_names)]
    labels_file = folder / by_name["probabilities"].label_filename
    assert labels_file.read_text().splitlines() == class_names
    assert not by_name["logits"].label_filename  # one labelled output, the probabilities

    # The model really accepts a full batch of the configured shape and returns the configured dims.
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    batch = np.zeros((config.max_batch_size, *image.dims), DTYPES[onnx.TensorProto.FLOAT][1])
    results = session.run([t.name for t in config.output], {image.name: batch})
    for tensor, result in zip(config.output, results):
        assert list(result.shape) == [config.max_batch_size, *tensor.dims]


def test_repository_from_exported_models(exported_models, tmp_path):
    repo = tmp_path / "triton"
    folders = triton.write_repository(exported_models, repo)
    manifest = json.loads((exported_models / "manifest.json").read_text())
    names = [triton.model_name(Path(m["file"])) for m in manifest["models"]]
    assert sorted(p.name for p in repo.iterdir()) == sorted(names)
    assert [f.name for f in folders] == names
    for entry, name in zip(manifest["models"], names):
        folder = repo / name
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
            "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
        check_model_folder(folder, exported_models / entry["file"])
        assert (folder / "labels.txt").read_text().splitlines() == entry["class_names"]


def test_export_cli_writes_repository(trained_run, tmp_path):
    from export.run import main

    out, repo = tmp_path / "models", tmp_path / "triton"
    assert main(["--run", str(trained_run), "--out", str(out), "--models", "resnet34_modified",
                 "--quantize", "int8", "--triton", str(repo)]) == 0
    files = [m["file"] for m in json.loads((out / "manifest.json").read_text())["models"]]
    assert sorted(files) == ["resnet34_modified.int8.onnx", "resnet34_modified.onnx"]
    assert sorted(p.name for p in repo.iterdir()) == ["resnet34_modified", "resnet34_modified_int8"]
    for file in files:
        check_model_folder(repo / triton.model_name(Path(file)), out / file)


def test_rejects_model_without_metadata(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    x = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["probabilities"])],
                                   "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(models / "bare.onnx"))
    (models / "manifest.json").write_text(json.dumps({"models": [{"name": "bare", "file": "bare.onnx"}]}))
    assert triton.main(["--models", str(models), "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "class_names" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "repo" / "bare").exists()

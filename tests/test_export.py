"""ONNX export: parity with PyTorch (including BN statistics), file facts, metadata, manifest and
clean failures."""
import datetime
import os
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import imaging
from conftest import ROOT, TINY_SIZE, run_python
from export import parity
from export.onnx_export import INPUT_NAME, METADATA_KEYS, OUTPUT_NAMES
from imaging.preprocessing import Preprocessing
from training.layers import ExpMish, PooledMish
from export.run import validation_images
from serve.catalog import CHECK_VALIDATION_IMAGES
from serve.predictor import create_session
from training import checkpoint
from training.models import ARCHITECTURES, MODEL_NAMES, create_model


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def val_images(trained_run):
    images, paths = validation_images(trained_run, Preprocessing(input_size=(TINY_SIZE, TINY_SIZE)))
    assert len(paths) == len(json.loads((trained_run / "splits.json").read_text())["val"]) > 0
    return images


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_trained_batchnorm_statistics_are_not_the_identity(trained_run, name):
    state = checkpoint.load(trained_run / name / "best.pt")["model_state"]
    variances = [t for k, t in state.items() if k.endswith("running_var")]
    means = [t for k, t in state.items() if k.endswith("running_mean")]
    assert len(variances) == len(means) > 30
    # Plain-34's unused projections never see data; every other BN layer has learned statistics.
    moved = [bool((v - 1).abs().max() > 1e-3) for v in variances]
    assert sum(moved) >= len(variances) - 3
    assert max(float(m.abs().max()) for m in means) > 1e-3


def test_parity_thresholds_are_the_specified_ones():
    assert (parity.MAX_LOGIT_DIFF, parity.MAX_PROB_DIFF) == (1e-4, 1e-5)
    assert 1 in parity.BATCH_SIZES
    assert any(b > 1 and b % 2 for b in parity.BATCH_SIZES)
    assert parity.RANDOM_INPUTS >= 32


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parity_with_pytorch(trained_run, exported_models, val_images, name):
    ckpt = checkpoint.load(trained_run / name / "best.pt")
    model = checkpoint.rebuild_model(ckpt)
    session = create_session(exported_models / f"{name}.onnx")
    # Fewer random inputs than export's own check (recorded below), at other batch sizes; the
    # probabilities are the checkpoint's softmax(logits / T).
    report = parity.check_parity(model, session, val_images, seed=1, random_inputs=8, batch_sizes=(1, 3),
                                 temperature=ckpt["calibration"]["temperature"])
    assert report.passed, report.summary()
    assert report.max_abs_logit_diff <= 1e-4 and report.max_abs_probability_diff <= 1e-5
    assert report.top1_mismatches == 0 and report.image_inputs == len(val_images)
    # Export ran the full check (32+ random inputs and the validation images) and recorded it.
    recorded = json.loads((exported_models / f"{name}.parity.json").read_text())
    assert recorded["passed"] and recorded["top1_mismatches"] == 0
    assert recorded["image_inputs"] == len(val_images) and recorded["random_inputs"] >= 32
    assert 1 in recorded["batch_sizes"] and any(b > 1 and b % 2 for b in recorded["batch_sizes"])
    assert recorded["max_abs_logit_diff"] <= 1e-4 and recorded["max_abs_probability_diff"] <= 1e-5
    assert recorded["max_relative_heatmap_diff"] <= 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_graph_without_the_bn_statistics_would_fail(trained_run, exported_models, val_images, name):
    model = checkpoint.rebuild_model(checkpoint.load(trained_run / name / "best.pt"))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    report = parity.check_parity(model, create_session(exported_models / f"{name}.onnx"), val_images,
                                 random_inputs=2, batch_sizes=(3,))
    assert not report.passed
    assert report.max_abs_logit_diff > parity.MAX_LOGIT_DIFF


def _scrambled(name: str, classes: int = 4) -> torch.nn.Module:
    """A model whose BatchNorm layers are far from the identity (statistics and affine), so no
    closed-form shortcut hides behind trivial values, and whose head's BatchNorm1d puts values
    on both sides of the LeakyReLU."""
    torch.manual_seed(3)
    model = create_model(name, classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.slow  # exports each model at a large input (30-45 s each on 2 cores)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_heatmaps_equal_autograd_gradcam_at_224_like_shapes(name, tmp_path):
    from export.onnx_export import export_model

    size = 96  # a 3 x 3 map: cells that differ, at a fraction of 224 px's cost
    model = _scrambled(name)
    spec = Preprocessing(input_size=(size, size))
    ckpt = checkpoint.model_record(name, model, ["a", "b", "c", "d"], spec)
    path = tmp_path / f"{name}.onnx"
    os.replace(export_model(ckpt, "test", path), path)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((9, 3, size, size)).astype(np.float32)
    report = parity.check_parity(model, create_session(path), images, random_inputs=4, batch_sizes=(1, 5))
    assert report.passed, report.summary()
    assert report.max_relative_heatmap_diff <= parity.MAX_HEATMAP_DIFF
    _, reference = parity.autograd_gradcam(model, torch.from_numpy(images))
    assert reference.shape == (9, 4, 3, 3) and float(reference.max()) > 0
    assert (reference.flatten(2).max(2).values > reference.flatten(2).min(2).values).any()  # not flat
    if ARCHITECTURES[name].head_width:  # the LeakyReLU's negative side is exercised
        with torch.no_grad():
            z = model.fc[1](model.fc[0](torch.flatten(model.avgpool(model.features(torch.from_numpy(images))), 1)))
        assert (z < 0).any() and (z > 0).any()
    # The check bites: maps of a head without its BatchNorm scale differ far beyond the bound.
    session = create_session(path)
    onnx_maps = session.run(["heatmaps"], {INPUT_NAME: images})[0]
    wrong = reference.numpy() * 1.01
    assert parity.relative_heatmap_diff(onnx_maps, wrong) > parity.MAX_HEATMAP_DIFF


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_file_facts(trained_run, exported_models, name):
    path = exported_models / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    (image,) = proto.graph.input
    assert image.name == INPUT_NAME == "image"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, *rest = image.type.tensor_type.shape.dim
    assert batch.dim_param and not batch.dim_value  # dynamic batch
    assert [d.dim_value for d in rest] == [3, TINY_SIZE, TINY_SIZE]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES) == ["logits", "probabilities", "heatmaps"]
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_value == 5
    heatmap_dims = [d.dim_value for d in proto.graph.output[2].type.tensor_type.shape.dim[2:]]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18

    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(METADATA_KEYS) <= set(meta)
    ckpt_path = trained_run / name / "best.pt"
    ckpt = checkpoint.load(ckpt_path)
    assert json.loads(meta["class_names"]) == ckpt["class_names"]
    # The preprocessing spec under timm's pretrained_cfg names and forms.
    assert json.loads(meta["input_size"]) == ckpt["preprocessing"]["input_size"] == [3, TINY_SIZE, TINY_SIZE]
    assert (meta["interpolation"], meta["crop_mode"], float(meta["crop_pct"])) == ("bilinear", "squash", 1.0)
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert Preprocessing.from_metadata(meta) == checkpoint.preprocessing_of(ckpt)
    assert "bilinear" in meta["resize"] and "no crop" in meta["resize"]
    assert meta["architecture"] == name
    assert meta["display_name"] == ARCHITECTURES[name].display_name
    assert json.loads(meta["architecture_spec"]) == ARCHITECTURES[name].to_dict()
    assert meta["heatmap_layer"] == "layer4" and json.loads(meta["heatmap_size"]) == heatmap_dims == [1, 1]
    assert float(meta["val_accuracy"]) == pytest.approx(ckpt["val_accuracy"], abs=1e-6)
    assert meta["checkpoint_sha256"] == _sha256(ckpt_path)
    assert meta["torch_version"] == torch.__version__ and meta["onnx_version"] == onnx.__version__
    assert meta["precision"] == "fp32"
    assert datetime.datetime.fromisoformat(meta["exported_at"]).tzinfo is not None
    # Nothing in the file names the machine it was built on (the exporter's stack traces do).
    data = path.read_bytes()
    for build_path in (str(ROOT), os.path.dirname(torch.__file__)):
        assert build_path.encode() not in data


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_dynamic_batch_and_softmax_in_the_graph(exported_models, batch):
    session = create_session(exported_models / "resnet34_modified.onnx")
    x = np.random.default_rng(batch).standard_normal((batch, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    logits, probabilities, heatmaps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    assert logits.shape == probabilities.shape == (batch, 5)
    assert heatmaps.shape == (batch, 5, 1, 1) and heatmaps.min() >= 0
    temperature = float(session.get_modelmeta().custom_metadata_map["temperature"])  # fitted after training
    expected = np.exp((logits - logits.max(1, keepdims=True)) / temperature)
    np.testing.assert_allclose(probabilities, expected / expected.sum(1, keepdims=True), atol=1e-6)


def test_manifest_matches_the_files(trained_run, exported_models):
    manifest = json.loads((exported_models / "manifest.json").read_text())
    fp32 = [e for e in manifest["models"] if e["precision"] == "fp32"]
    assert [e["name"] for e in fp32] == list(MODEL_NAMES)
    for entry in manifest["models"]:
        path = exported_models / entry["file"]
        assert entry["sha256"] == _sha256(path)
        assert entry["size_bytes"] == path.stat().st_size
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert entry["class_names"] == json.loads(meta["class_names"])
        assert entry["preprocessing"] == Preprocessing.from_metadata(meta).to_dict()
        assert entry["preprocessing"]["input_size"] == json.loads(meta["input_size"])
        assert entry["display_name"] == meta["display_name"]
        assert entry["checkpoint_sha256"] == _sha256(trained_run / entry["name"] / "best.pt")
    for entry in fp32:
        assert entry["parity"]["passed"]
        report = json.loads((trained_run / entry["name"] / "report.json").read_text())
        assert entry["val_accuracy"] == pytest.approx(report["val_accuracy"], abs=1e-6)
    assert manifest["examples"]
    for example in manifest["examples"]:
        assert (exported_models / example).is_file()
        imaging.load_rgb(exported_models / example)  # a real image
    # The engine choice's check images: the first validation images, copied into the folder.
    val = json.loads((trained_run / "splits.json").read_text())["val"]
    assert 0 < len(manifest["check_images"]) == min(len(val), CHECK_VALIDATION_IMAGES)
    for name, (source, _) in zip(manifest["check_images"], val):
        assert name.startswith("check/") and _sha256(exported_models / name) == _sha256(Path(source))


def test_model_card_is_generated_from_the_manifest_and_reports(trained_run, exported_models):
    import yaml

    text = (exported_models / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "onnx"
    assert "image-classification" in front["tags"] and {"accuracy", "f1"} <= set(front["metrics"])
    manifest = json.loads((exported_models / "manifest.json").read_text())
    assert len(front["model-index"]) == len(manifest["models"])
    body = text.split("---\n", 2)[2]
    for entry, indexed in zip(manifest["models"], front["model-index"]):
        report = json.loads((trained_run / entry["name"] / "report.json").read_text())
        metrics = {m["name"]: m["value"] for m in indexed["results"][0]["metrics"]}
        assert metrics["val accuracy"] == pytest.approx(report["val_accuracy"], abs=1e-4)
        assert metrics["val macro-F1"] == pytest.approx(report["val_macro_f1"], abs=1e-4)  # as the trainer stored it
        assert f"`{entry['file']}`" in body and f"{report['val_accuracy']:.1%}" in body
        assert f"{entry['parity']['max_abs_logit_diff']:.1e}" in body
    assert ", ".join(f"`{c}`" for c in manifest["models"][0]["class_names"]) in body
    assert "Intended use and limits" in body and "squash" in body


def test_exp_mish_is_mish():
    x = torch.cat([torch.linspace(-120, 120, 20001), torch.tensor([0.0, -1e-30, 1e-30, 19.9, 20.1, 88.0, 1e4])])
    torch.testing.assert_close(ExpMish()(x), torch.nn.functional.mish(x), atol=1e-6, rtol=1e-5)


def test_pooled_mish_is_max_pool_of_mish():
    pool = torch.nn.MaxPool2d(3, 2, 1)
    torch.manual_seed(0)
    # Values on both sides of Mish's minimum (x = -1.19), where max(mish) may come from the minimum.
    x = torch.cat([torch.randn(4, 8, 17, 16) * 3, torch.full((1, 8, 17, 16), -1.19),
                   torch.linspace(-9, 9, 8 * 17 * 16).reshape(1, 8, 17, 16)])
    torch.testing.assert_close(PooledMish(pool)(x), pool(torch.nn.functional.mish(x)),
                               atol=1e-6, rtol=1e-5)


def _copy_run(trained_run, target, models):
    """The files export needs (splits and best checkpoints), for tests that tamper with them."""
    target.mkdir()
    shutil.copy(trained_run / "splits.json", target / "splits.json")
    for dest, source in models.items():
        (target / dest).mkdir()
        shutil.copy(trained_run / source / "best.pt", target / dest / "best.pt")
    return target


def test_failed_parity_leaves_no_onnx_file(trained_run, tmp_path, monkeypatch, capsys):
    from export.run import main

    monkeypatch.setattr(parity, "MAX_LOGIT_DIFF", -1.0)  # no export can pass this
    out = tmp_path / "models"
    assert main(["--run", str(trained_run), "--out", str(out), "--models", "resnet34"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "parity check failed" in err[0], err
    assert not list(out.glob("*.onnx")) and not list(out.glob(".*"))  # no file, no temporary
    assert not (out / "manifest.json").exists()


def test_checkpoint_of_another_architecture_is_refused(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run", {"plain34": "resnet34"})
    out = tmp_path / "models"
    result = run_python(["-m", "export.run", "--run", str(run), "--out", str(out), "--models", "plain34"])
    assert result.returncode == 2  # the user's file: a user mistake
    assert "Traceback" not in result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "holds a resnet34 model, not plain34" in err[0], result.stderr
    assert not out.exists() or not list(out.glob("*.onnx"))


@pytest.mark.parametrize("field", ["class_names", "preprocessing", "architecture_spec", "model_state"])
def test_checkpoint_missing_a_field_is_a_clear_error(trained_run, tmp_path, capsys, field):
    from export.run import main

    run = _copy_run(trained_run, tmp_path / "run", {"resnet34": "resnet34"})
    ckpt = checkpoint.load(run / "resnet34" / "best.pt")
    del ckpt[field]
    torch.save(ckpt, run / "resnet34" / "best.pt")
    out = tmp_path / "models"
    assert main(["--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"lacks field(s): {field}" in err[0], err
    assert not out.exists() or not list(out.glob("*.onnx"))


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    from export.run import main

    assert main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]

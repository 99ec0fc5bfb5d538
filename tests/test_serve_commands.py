"""``python -m serve.predict`` and ``python -m serve.evaluate`` run as a user runs them (child
processes, torch made unimportable), checked against the predictor run in this process."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_python
from serve.predictor import Predictor
from test_app import copy_models, edit_metadata
from test_predictor import BLOCKER

MODELS = ("plain34", "resnet34", "resnet34_modified")


@pytest.fixture
def torch_free(tmp_path):
    """PYTHONPATH that makes torch, torchvision, training and export impossible to import."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": f"{tmp_path / 'blocker'}:{ROOT}"}


def images_folder(tiny_dataset, target):
    """A few of the built-in images in nested folders, plus a broken file and a non-image."""
    (target / "nested" / "deeper").mkdir(parents=True)
    sources = sorted(p for p in tiny_dataset.rglob("*") if p.suffix in (".jpg", ".png") and p.stat().st_size > 1000)
    for i, source in enumerate(sources[:9]):
        folder = target if i < 3 else target / "nested" if i < 6 else target / "nested" / "deeper"
        shutil.copy(source, folder / f"{i:02d}_{source.name}")
    jpeg = next(p for p in sources if p.suffix == ".jpg").read_bytes()
    (target / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (target / "notes.txt").write_text("not an image, and not picked up from a folder")
    return target


def expected(models_dir, path):
    return {name: Predictor(models_dir / f"{name}.onnx").predict_file(path).probabilities for name in MODELS}


def test_predict_writes_csv_for_every_image_and_lists_unusable_files(exported_models, tiny_dataset, tmp_path,
                                                                     torch_free):
    folder = images_folder(tiny_dataset, tmp_path / "photos")
    single = tmp_path / "single.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(single)
    done = run_python(["-m", "serve.predict", str(folder), str(single), "--models", str(exported_models),
                       "--batch-size", "4", "--workers", "2"], env=torch_free)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    by_path = {r["path"]: r for r in rows}
    images = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "broken.jpg")
    assert set(by_path) == {str(p) for p in images} | {str(single), str(folder / "broken.jpg")}
    for path in [*images, single]:
        row = by_path[str(path)]
        assert row["error"] == ""
        for name, probs in expected(exported_models, path).items():
            got = {c: float(row[f"{name}.{c}"]) for c in probs}
            assert got == pytest.approx(probs, abs=1e-5)
            assert row[f"{name}.top_class"] == max(probs, key=probs.get)
    assert "unreadable image data" in by_path[str(folder / "broken.jpg")]["error"]
    assert "1 file(s) could not be used" in done.stderr and "broken.jpg" in done.stderr.splitlines()[-2]


def test_predict_writes_json_lines_by_extension_with_int8(exported_models, tmp_path, torch_free):
    models = copy_models(exported_models, tmp_path)
    with_int8_twin(models)
    image = tmp_path / "a.png"
    Image.new("RGB", (33, 31), (20, 30, 200)).save(image)
    out = tmp_path / "out.jsonl"
    done = run_python(["-m", "serve.predict", str(image), "--models", str(models), "--precision", "int8",
                       "--out", str(out), "--workers", "0"], env=torch_free)
    assert done.returncode == 0, done.stderr
    (line,) = out.read_text().splitlines()
    record = json.loads(line)
    assert record["path"] == str(image) and list(record["models"]) == ["resnet34"]
    probs = Predictor(models / "resnet34.int8.onnx").predict_file(image).probabilities
    assert record["models"]["resnet34"]["probabilities"] == pytest.approx(probs, abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (["/no/such/place"], "no such file or folder"),
    (["EMPTY"], "no images"),
    (["IMAGE", "--models", "/no/models"], "does not exist"),
    (["IMAGE", "--out", "result.xlsx"], ".csv or .jsonl"),
    (["BROKEN"], "none of the 1 file(s) could be classified"),
])
def test_predict_user_mistakes_exit_2_in_one_line(exported_models, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    names = {"EMPTY": str(tmp_path / "empty"), "IMAGE": str(tmp_path / "x.png"),
             "BROKEN": str(tmp_path / "broken.png")}
    done = run_python(["-m", "serve.predict", *[names.get(a, a) for a in args],
                       *([] if "--models" in args else ["--models", str(exported_models)])], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr


def with_int8_twin(models):
    """Declare a copy of resnet34.onnx as its INT8 file: the same answers, so agreement 1.0."""
    shutil.copy(models / "resnet34.onnx", models / "resnet34.int8.onnx")
    edit_metadata(models / "resnet34.int8.onnx", lambda props: props.update(precision="int8"))
    manifest = json.loads((models / "manifest.json").read_text())
    entry = next(e for e in manifest["models"] if e["name"] == "resnet34")
    manifest["models"].append({**entry, "file": "resnet34.int8.onnx", "precision": "int8"})
    (models / "manifest.json").write_text(json.dumps(manifest))


def test_evaluate_reports_metrics_matching_the_predictor(exported_models, tiny_dataset, tmp_path, torch_free):
    models = copy_models(exported_models, tmp_path)
    with_int8_twin(models)
    out = tmp_path / "eval"
    done = run_python(["-m", "serve.evaluate", str(tiny_dataset), "--models", str(models), "--out", str(out)],
                      env=torch_free)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    classes = report["class_names"]
    files = [(p, p.parent.name) for p in sorted(tiny_dataset.rglob("*")) if p.is_file()]
    predictions, truth = {}, []
    for path, label in files:
        try:
            per_model = expected(models, path)
        except Exception:  # noqa: BLE001 - the dataset's two broken files
            continue
        truth.append(label)
        for name, probs in per_model.items():
            predictions.setdefault(name, []).append(max(probs, key=probs.get))
    assert report["images"] == len(truth) and len(report["unusable"]) == 2
    assert [(m["name"], m["precision"]) for m in report["models"]] == \
        [(n, "fp32") for n in MODELS] + [("resnet34", "int8")]
    for m in report["models"]:
        guessed = predictions[m["name"]]
        assert m["accuracy"] == pytest.approx(np.mean([g == t for g, t in zip(guessed, truth)]))
        confusion = np.array(m["confusion"])
        assert confusion.sum() == len(truth)
        for k, c in enumerate(classes):
            tp = sum(g == t == c for g, t in zip(guessed, truth))
            assert confusion[k, k] == tp
            recall = tp / truth.count(c)
            assert m["per_class"][c]["recall"] == pytest.approx(recall)
        assert m["macro_f1"] == pytest.approx(np.mean([v["f1"] for v in m["per_class"].values()]))
        png = Image.open(out / m["confusion_png"])
        assert png.format == "PNG" and png.size[0] > 200
    pairs = {(p["a"], p["b"]): p["top1_agreement"] for p in report["agreement"]}
    assert len(pairs) == 5  # every pair of the four model files but the twins
    a, b = predictions["plain34"], predictions["resnet34"]
    assert pairs[("plain34.fp32", "resnet34.fp32")] == pytest.approx(np.mean([x == y for x, y in zip(a, b)]))
    assert report["int8_vs_fp32"] == [{"a": "resnet34.fp32", "b": "resnet34.int8", "top1_agreement": 1.0}]
    text = (out / "report.md").read_text()
    assert "ResNet-34-Modified" in text and "INT8 files against their FP32 twins" in text


def test_evaluate_reads_a_labels_csv(exported_models, tiny_dataset, tmp_path):
    images = sorted(p for p in tiny_dataset.rglob("*.jpg"))[:6]
    rows = ["filename,label"] + [f"{p.relative_to(tiny_dataset)},{p.parent.name}" for p in images]
    (tmp_path / "labels.csv").write_text("\n".join(rows + ["missing.jpg,dots"]) + "\n")
    done = run_python(["-m", "serve.evaluate", str(tiny_dataset), "--labels-csv", str(tmp_path / "labels.csv"),
                       "--models", str(exported_models), "--out", str(tmp_path / "eval"), "--workers", "0"])
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["images"] == 6
    assert [u["path"] for u in report["unusable"]] == [str(tiny_dataset / "missing.jpg")]


def test_evaluate_refuses_classes_the_models_do_not_know(exported_models, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    for label in ("dots", "cats"):
        (data / label).mkdir(parents=True)
        shutil.copy(next(tiny_dataset.rglob("*.jpg")), data / label / "a.jpg")
    done = run_python(["-m", "serve.evaluate", str(data), "--models", str(exported_models),
                       "--out", str(tmp_path / "eval")])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "cats" in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "eval").exists()

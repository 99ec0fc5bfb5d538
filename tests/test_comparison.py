"""Repeated runs (seeds, folds), per-image predictions and the comparison built from them."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_SIZE, run_python
from common import statistics
from common.run_layout import RunLayout

MODELS = ("plain34", "resnet34")


# --- runs with --seeds and --folds ---------------------------------------------------------------

def _args(data, out, *extra) -> list[str]:
    return ["--data", str(data), "--models", ",".join(MODELS), "--epochs", "1",
            "--image-size", str(TINY_SIZE), "--batch-size", "8", "--workers", "0",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def seeds_run(tiny_dataset, tmp_path_factory):
    from training.run import main

    run_dir = tmp_path_factory.mktemp("seeds") / "run"
    assert main(_args(tiny_dataset, run_dir, "--seeds", "2", "--test-fraction", "0.2")) == 0
    return run_dir


@pytest.fixture(scope="module")
def folds_run(tiny_dataset, tmp_path_factory):
    from training.run import main

    run_dir = tmp_path_factory.mktemp("folds") / "run"
    assert main(_args(tiny_dataset, run_dir, "--folds", "3", "--test-fraction", "0.2")) == 0
    return run_dir


def _predictions(folder):
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_seeds_give_one_folder_per_model_and_seed(seeds_run):
    for name in MODELS:
        assert sorted(p.name for p in (seeds_run / name).iterdir() if p.is_dir()) == ["seed-67", "seed-68"]
        for seed in (67, 68):
            folder = seeds_run / name / f"seed-{seed}"
            for file in ("best.pt", "last.pt", "history.csv", "curves.png", "confusion.png",
                         "report.json", "predictions.csv"):
                assert (folder / file).is_file(), (folder, file)
            last = torch.load(folder / "last.pt", weights_only=True)
            assert last["config"]["seed"] == seed
        a, b = (torch.load(seeds_run / name / f"seed-{s}" / "best.pt", weights_only=True) for s in (67, 68))
        assert not torch.equal(a["model_state"]["conv1.weight"], b["model_state"]["conv1.weight"])
        assert (seeds_run / name / "errors.png").is_file()
    # The same split for every seed.
    splits = [{r["path"] for r in _predictions(seeds_run / "resnet34" / f"seed-{s}")} for s in (67, 68)]
    assert splits[0] == splits[1]


def test_the_layout_names_the_folder_and_files_of_each_seed(seeds_run):
    from training.study import run_members

    layout = RunLayout(seeds_run)
    for name in MODELS:
        runs = [layout.member_files(name, member) for member in run_members(seeds_run)]
        assert [files.folder for files in runs] == sorted(p for p in (seeds_run / name).iterdir() if p.is_dir())
        for files in runs:  # no ood.csv: the run has no out-of-distribution images
            assert set(files.folder.iterdir()) == {
                files.best_checkpoint, files.last_checkpoint, files.report, files.predictions, files.history,
                files.logits, files.curves_png, files.confusion_png}
        assert layout.errors_png(name).is_file()


@pytest.mark.slow  # trains (through the fixture it names)
@pytest.mark.parametrize("fixture", ["seeds_run", "folds_run"])
def test_predictions_csv_agrees_with_the_report(fixture, request):
    run_dir = request.getfixturevalue(fixture)
    classes = json.loads((run_dir / "splits.json").read_text())["class_names"]
    for folder in (run_dir / "resnet34").iterdir():
        if not folder.is_dir():
            continue
        report = json.loads((folder / "report.json").read_text())
        rows = _predictions(folder)
        assert set(rows[0]) == {"split", "path", "label", "predicted", *(f"prob_{c}" for c in classes)}
        for split in ("val", "test"):
            mine = [r for r in rows if r["split"] == split]
            accuracy = np.mean([r["label"] == r["predicted"] for r in mine])
            assert accuracy == pytest.approx(report[f"{split}_accuracy"])
            for r in mine:
                probs = [float(r[f"prob_{c}"]) for c in classes]
                assert sum(probs) == pytest.approx(1, abs=1e-4)
                assert classes[int(np.argmax(probs))] == r["predicted"]


def test_every_image_is_validated_exactly_once_with_folds(folds_run):
    splits = json.loads((folds_run / "splits.json").read_text())
    pool = [p for fold in splits["folds"] for p, _ in fold]
    test = {p for p, _ in splits["test"]}
    assert len(splits["folds"]) == 3 and not set(pool) & test
    for name in MODELS:
        assert sorted(p.name for p in (folds_run / name).iterdir() if p.is_dir()) == ["fold-1", "fold-2", "fold-3"]
        validated = Counter(r["path"] for k in (1, 2, 3)
                            for r in _predictions(folds_run / name / f"fold-{k}") if r["split"] == "val")
        assert set(validated) == set(pool) and set(validated.values()) == {1}
        # Stratified: every fold validates on every class.
        for k in (1, 2, 3):
            labels = {r["label"] for r in _predictions(folds_run / name / f"fold-{k}") if r["split"] == "val"}
            assert len(labels) == len(splits["class_names"])
    # Each fold trained on the images it did not validate on (its training set is the others).
    from training.study import run_members, split_lists

    for member in run_members(folds_run):
        lists = split_lists(folds_run, member)
        assert not {p for p, _ in lists["train"]} & {p for p, _ in lists["val"]}
        assert len(lists["train"]) + len(lists["val"]) == len(pool)


def test_the_comparison_aggregates_the_runs(seeds_run):
    summary = json.loads((seeds_run / "comparison.json").read_text())
    assert summary["runs"] == ["seed-67", "seed-68"]
    for name in MODELS:
        reports = [json.loads((seeds_run / name / f"seed-{s}" / "report.json").read_text()) for s in (67, 68)]
        for split in ("val", "test"):
            for key in ("accuracy", "macro_f1", "loss"):
                values = [r[f"{split}_{key}"] for r in reports]
                est = summary["models"][name][split][key]
                assert est["mean"] == pytest.approx(np.mean(values))
                assert est["std"] == pytest.approx(np.std(values, ddof=1))
    # Two seeds: the exact test over images on both seeds' predictions decides (per image, the
    # lead summed over the seeds); too few runs for training randomness, and it says so.
    (pair,) = summary["pairs"]["test"]
    a, b = pair["models"]
    rows = {n: [{r["path"]: r["label"] == r["predicted"] for r in _predictions(seeds_run / n / f"seed-{s}")
                 if r["split"] == "test"} for s in (67, 68)] for n in (a, b)}
    paths = sorted(rows[a][0])
    expected = statistics.over_images([[run[p] for p in paths] for run in rows[a]],
                                      [[run[p] for p in paths] for run in rows[b]])
    assert pair["primary"] == expected.as_dict() and pair["primary"]["covers"] == statistics.IMAGES
    assert pair["difference_points"] >= 0  # the model ahead first
    means = [summary["models"][m]["test"]["accuracy"]["mean"] for m in (a, b)]
    assert pair["difference_points"] == pytest.approx(100 * (means[0] - means[1]))  # what the table shows
    text = (seeds_run / "comparison.md").read_text()
    assert pair["sentence"] in text.split("## What the data supports")[1].split("\n## ")[0]
    assert "## Test" in text and "comparison.png" in text and "too few to estimate training randomness" in text
    assert (seeds_run / "comparison.png").stat().st_size > 10_000


def test_folds_pool_every_image_once_for_mcnemar_and_wilson(folds_run):
    summary = json.loads((folds_run / "comparison.json").read_text())
    pooled = summary["models"]["resnet34"]["val"]["accuracy_over_images"]
    rows = [r for k in (1, 2, 3) for r in _predictions(folds_run / "resnet34" / f"fold-{k}") if r["split"] == "val"]
    assert pooled["n"] == len(rows)
    assert pooled["mean"] == pytest.approx(np.mean([r["label"] == r["predicted"] for r in rows]))
    pair = summary["pairs"]["val"][0]
    assert pair["over_images"]["images"] == len(rows)  # the exact test: every pooled image once
    # Over the folds: the corrected resampled t-test, or (folds that do not differ at all) the
    # exact test on the pooled images, never a plain t-test over overlapping training sets.
    assert pair["primary"]["test"] in ("corrected resampled t-test over 3 folds", "McNemar exact test")
    assert "Each fold's validation images also chose that fold's epoch" in (folds_run / "comparison.md").read_text()


def test_export_picks_a_run_and_records_it(seeds_run, folds_run, tmp_path):
    from export.run import main
    from serve.predictor import Predictor

    assert main(["--run", str(seeds_run), "--out", str(tmp_path / "a"), "--models", "resnet34"]) == 0
    losses = {s: json.loads((seeds_run / "resnet34" / f"seed-{s}" / "report.json").read_text())["val_loss"]
              for s in (67, 68)}
    best = min(losses, key=losses.get)
    assert Predictor(tmp_path / "a" / "resnet34.onnx").metadata["training_run"] == f"seed-{best}"
    card = (tmp_path / "a" / "README.md").read_text()
    assert f"the `seed-{best}` run, the lowest validation loss among 2 runs (best of 2" in card
    assert main(["--run", str(folds_run), "--out", str(tmp_path / "b"), "--models", "resnet34", "--fold", "2"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["models"][0]["training_run"] == "fold-2"
    assert "the `fold-2` run, chosen by --fold among 3 runs" in (tmp_path / "b" / "README.md").read_text()
    assert main(["--run", str(folds_run), "--out", str(tmp_path / "c"), "--models", "resnet34", "--seed", "99"]) == 2


@pytest.mark.slow  # four training.run processes (about 40 s)
def test_folds_with_a_val_folder_is_a_one_line_error(tmp_path, tiny_dataset):
    for split in ("train", "val"):
        for cls in ("checks", "dots"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for image in sorted((tiny_dataset / cls).glob("*.png"))[:3]:
                (tmp_path / "data" / split / cls / image.name).write_bytes(image.read_bytes())
    result = run_python(["-m", "training.run", *_args(tmp_path / "data", tmp_path / "run", "--folds", "3")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--folds" in lines[0] and "val/" in lines[0], result.stderr
    # A premade train/ + test/ (no val/) is what folds are for.
    (tmp_path / "data" / "val").rename(tmp_path / "data" / "test")
    from training.config import make_config
    from training.data import cross_validation_folds
    from training.distributed import World
    from training.run import load_dataset

    config = make_config({"data": str(tmp_path / "data"), "folds": 3, "image_size": TINY_SIZE})
    data = load_dataset(config, World())
    assert "val" not in data.splits and len(data.splits["test"]) == 6
    folds = cross_validation_folds(data, 3, config.seed)
    assert sorted(p for f in folds for p in f.splits["val"].paths) == sorted(data.splits["train"].paths)
    for argv in (["--seeds", "2", "--folds", "3"], ["--folds", "1"], ["--seeds", "0"]):
        assert run_python(["-m", "training.run", *_args(tiny_dataset, tmp_path / "r2", *argv)]).returncode == 2


# --- resume of a multi-run study ----------------------------------------------------------------------

SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}


def _study_args(data, out):
    return ["-m", "training.run", "--data", str(data), "--models", "resnet34", "--seeds", "2",
            "--epochs", "2", "--image-size", str(TINY_SIZE), "--batch-size", "8", "--workers", "0",
            "--out", str(out)]


@pytest.mark.slow  # trains a model
def test_a_study_killed_in_its_second_run_resumes_to_the_uninterrupted_result(tiny_dataset, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    second = resumed / "resnet34" / "seed-68" / "last.pt"
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_python, _study_args(tiny_dataset, full), env=SINGLE_THREAD)
        env = {**os.environ, "PYTHONPATH": str(ROOT), **SINGLE_THREAD}
        proc = subprocess.Popen([sys.executable, *_study_args(tiny_dataset, resumed)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert job.result().returncode == 0
    assert torch.load(second, weights_only=True)["epoch"] == 1, "killed in the second run's first epoch"
    assert not (resumed / "comparison.json").exists()
    again = run_python(["-m", "training.run", "--resume", str(resumed)], env=SINGLE_THREAD)
    assert again.returncode == 0, again.stderr
    assert "ResNet-34: resuming after epoch 2 (already finished)" in again.stdout  # seed 67 skipped
    assert "ResNet-34: resuming after epoch 1" in again.stdout
    for seed in (67, 68):
        a, b = (torch.load(run / "resnet34" / f"seed-{seed}" / "last.pt", weights_only=True) for run in (full, resumed))
        for key, tensor in a["model_state"].items():
            assert torch.equal(tensor, b["model_state"][key]), (seed, key)
    a, b = (json.loads((run / "comparison.json").read_text())["models"] for run in (full, resumed))
    assert a == b

"""DistributedDataParallel on CPU: two processes with gloo, launched by torchrun.

One uninterrupted run (two models, two epochs, the first with a frozen backbone so DDP is
re-wrapped mid-run) is checked for a single set of artifacts and for validation metrics over
the whole validation split; a second run is stopped by a SIGTERM to torchrun after the first
epoch, resumed with --resume, and must end with exactly the weights of the uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from common import metrics
from conftest import ROOT, TINY_SIZE, run_python
from imaging.preprocessing import Preprocessing
from training import checkpoint
from training.config import TrainConfig
from training.data import SplitImages
from training.distributed import World
from training.engine import Precision, evaluate
from training.transforms import EvalTransform, pixel_tensor

pytestmark = pytest.mark.slow

PROCESSES = 2
MODELS = ("plain34", "resnet34_modified")
MODEL_FILES = {"best.pt", "last.pt", "history.csv", "curves.png", "confusion.png", "report.json",
               "predictions.csv", "errors.png", "logits.csv"}
RUN_FILES = {"config.json", "bad_files.json", "splits.json", "comparison.md", "comparison.json",
             "comparison.png", "heatmaps.png", "calibration.png"}
# --standalone: a free local port, so parallel runs never collide.
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES)]


def train_args(data: Path, weights: Path) -> list[str]:
    # A high learning rate moves the models far from uniform outputs in two epochs, so a
    # metric over one shard differs clearly from one over the whole split.
    return ["-m", "training.run", "--data", str(data), "--epochs", "2", "--image-size", str(TINY_SIZE),
            "--batch-size", "8", "--workers", "0", "--lr", "0.005", "--models", ",".join(MODELS),
            "--init-weights", str(weights), "--freeze-epochs", "1"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet34-torchvision.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet34().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ddp_run(tiny_dataset, weights, tmp_path_factory):
    """The uninterrupted run, in its own working folder (default run folder: runs/<date-time>)."""
    cwd = tmp_path_factory.mktemp("ddp")
    result = run_python([*TORCHRUN, *train_args(tiny_dataset, weights)], cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, result


def only_run(cwd: Path) -> Path:
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, f"expected one run folder, found {sorted(p.name for p in runs)}"
    return runs[0]


def files_of(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def expected_files() -> set[str]:
    return RUN_FILES | {f"{m}/{f}" for m in MODELS for f in MODEL_FILES}


def test_one_set_of_artifacts(ddp_run):
    cwd, result = ddp_run
    run_dir = only_run(cwd)
    assert files_of(run_dir) == expected_files()  # no temp files, nothing from a second rank
    assert result.stdout.count("Run folder:") == 1
    assert result.stdout.count("Init weights: loaded 216") == len(MODELS)
    assert f"Device: cpu x {PROCESSES} processes" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["freeze_epochs"] == 1 and config["init_weights"]


def validation_split(run_dir: Path, spec: Preprocessing) -> SplitImages:
    """All validation images of the run, decoded by the training code."""
    val = json.loads((run_dir / "splits.json").read_text())["val"]
    paths = [p for p, _ in val]
    return SplitImages(torch.stack([pixel_tensor(p, spec) for p in paths]),
                       torch.tensor([label for _, label in val]), paths)


def single_process_eval(model, split: SplitImages, spec: Preprocessing):
    cpu = torch.device("cpu")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=TrainConfig().label_smoothing)
    return evaluate(model, split, criterion, EvalTransform(spec), Precision(cpu), cpu, World())


@pytest.mark.parametrize("name", MODELS)
def test_validation_metrics_cover_the_whole_split(ddp_run, name):
    run_dir = only_run(ddp_run[0])
    report = json.loads((run_dir / name / "report.json").read_text())
    with open(run_dir / name / "history.csv") as f:
        history = {int(row["epoch"]): row for row in csv.DictReader(f)}
    best, last = (checkpoint.load(run_dir / name / f) for f in ("best.pt", "last.pt"))
    spec = checkpoint.preprocessing_of(best)
    split = validation_split(run_dir, spec)

    # The final report, the evaluation stored with best.pt and the history row of the best
    # epoch all agree with one process evaluating every validation image with best.pt.
    whole = single_process_eval(checkpoint.rebuild_model(best), split, spec)
    row = history[best["epoch"]]
    for loss, accuracy in ((report["val_loss"], report["val_accuracy"]),
                           (best["val_loss"], best["val_accuracy"]),
                           (float(row["val_loss"]), float(row["val_accuracy"]))):
        assert loss == pytest.approx(whole.loss, rel=1e-5)
        assert accuracy == pytest.approx(whole.accuracy, abs=1e-9)
    assert sum(c["support"] for c in report["per_class"].values()) == len(split)
    matrix = metrics.confusion_matrix(whole.labels, whole.predictions, len(report["class_names"]))
    assert report["per_class"] == metrics.per_class_metrics(matrix, report["class_names"])

    # So does the last epoch's row with last.pt: after full DDP training steps, every rank
    # evaluated its shard with the model rank 0 saved (same BatchNorm statistics).
    last_model = checkpoint.rebuild_model(last)
    whole = single_process_eval(last_model, split, spec)
    assert float(history[last["epoch"]]["val_loss"]) == pytest.approx(whole.loss, rel=1e-5)
    assert float(history[last["epoch"]]["val_accuracy"]) == pytest.approx(whole.accuracy, abs=1e-9)
    # The check bites: either rank's shard alone gives a clearly different loss.
    for rank in range(PROCESSES):
        rows = torch.arange(rank, len(split), PROCESSES)
        shard = single_process_eval(last_model, SplitImages(split.images[rows], split.labels[rows],
                                                            [split.paths[i] for i in rows]), spec)
        assert shard.loss != pytest.approx(whole.loss, rel=1e-3)


def test_resume_after_stop_matches_uninterrupted_run(ddp_run, tiny_dataset, weights, tmp_path):
    cwd = tmp_path / "stopped"
    cwd.mkdir()
    log = open(tmp_path / "first.log", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *TORCHRUN, *train_args(tiny_dataset, weights)], cwd=cwd,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not list(cwd.glob("runs/*/plain34/last.pt")):  # the first epoch is saved
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers, as on preemption
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    run_dir = only_run(cwd)
    assert not (run_dir / "plain34" / "report.json").exists()  # it really stopped mid-run

    result = run_python([*TORCHRUN, "-m", "training.run", "--resume", str(run_dir)], cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Plain-34: resuming after epoch" in result.stdout
    assert files_of(run_dir) == expected_files()

    reference = only_run(ddp_run[0])
    for name in MODELS:
        resumed = checkpoint.load(run_dir / name / "last.pt")
        uninterrupted = checkpoint.load(reference / name / "last.pt")
        assert resumed["epoch"] == uninterrupted["epoch"] == 2
        for key, tensor in uninterrupted["model_state"].items():
            assert torch.equal(resumed["model_state"][key], tensor), f"{name}: {key}"
        assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in uninterrupted["history"]]

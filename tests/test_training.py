"""The training loop: fresh augmentation, early stopping, best weights, exact resume, checkpoints,
configuration and reports."""
import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from common.files import atomic_write
from conftest import EASY_MODELS, ROOT, TINY_SIZE, run_python
from imaging.preprocessing import Preprocessing
from training import checkpoint, transforms
from training.checkpoint import CheckpointError, rebuild_model
from training.config import QUICK_PROFILE, ConfigError, TrainConfig, config_from_args, make_config
from training.data import SplitImages, TrainingSamples
from training.engine import EarlyStopping, Precision
from training.models import ARCHITECTURES, MODEL_NAMES, count_parameters
from training.reports import HISTORY_COLUMNS
from training.trainer import AugmentedBatches
from training.transforms import EvalTransform, TrainAugment, pixel_tensor

SIZE = (TINY_SIZE, TINY_SIZE)
SPEC = Preprocessing(input_size=SIZE)
EXPECTED_PARAMETERS = {"plain34": 21_287_237, "resnet34": 21_287_237, "resnet34_modified": 21_708_101}


# --- augmentation drawn fresh every epoch ----------------------------------------------------

@pytest.fixture(scope="module")
def augmented():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, *SIZE), dtype=torch.uint8, generator=g)
    split = SplitImages(images, torch.arange(6) % 2, [f"img{i}.png" for i in range(6)])
    return split, TrainAugment(size=SIZE)


def _sample(split, augment, seed, epoch, index):
    dataset = TrainingSamples(split, augment, seed)
    dataset.set_epoch(epoch)
    image, parameters, _ = dataset[index]
    return augment(image[None], parameters[None])[0]


def test_augmentation_is_fresh_every_epoch(augmented):
    split, augment = augmented
    first, second = (_sample(split, augment, seed=1, epoch=e, index=0) for e in (1, 2))
    assert first.shape == (3, *SIZE) and first.dtype == torch.float32
    assert not torch.allclose(first, second)
    # ... and it is an augmentation: not the plain validation view of the image.
    assert not torch.allclose(first, EvalTransform(SPEC)(split.images[0]))


def test_augmentation_is_reproducible_per_seed_epoch_index(augmented):
    split, augment = augmented
    a = _sample(split, augment, seed=1, epoch=3, index=2)
    assert torch.equal(a, _sample(split, augment, seed=1, epoch=3, index=2))
    assert not torch.allclose(a, _sample(split, augment, seed=2, epoch=3, index=2))
    # Two samples of one epoch get different draws, not the same crop of different pictures.
    assert not torch.allclose(a, _sample(split, augment, seed=1, epoch=3, index=3))


def test_augmentation_leaves_the_global_rng_alone(augmented):
    split, augment = augmented
    state = torch.get_rng_state()
    _sample(split, augment, seed=1, epoch=1, index=0)
    assert torch.equal(state, torch.get_rng_state())


def test_augmentation_does_not_depend_on_workers_or_batch_size(augmented):
    split, augment = augmented
    dataset = TrainingSamples(split, augment, seed=4)

    def batches(workers, batch_size):
        out = []
        for epoch in (1, 2):
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
            out += [images for images, _ in AugmentedBatches(loader, augment, torch.device("cpu"))]
        return torch.cat(out)

    in_process = batches(0, 4)
    assert torch.equal(in_process, batches(2, 4))
    assert torch.allclose(in_process, batches(0, 1), atol=1e-5)
    assert not torch.allclose(in_process[:6], in_process[6:])  # the two epochs differ


def test_augmentation_with_neutral_parameters_is_the_validation_view(augmented):
    split, augment = augmented
    h, w = SIZE
    # Whole image, no flip, no turn, neutral colours, no shift, the smallest blur, no erasing.
    neutral = torch.tensor([[0, 0, h, w, 0, 0, 1, 1, 1, 0, 0, 1, 2, 3, 0, 0, 0.1, 0, 0, 0, 0, 0]] * 6,
                           dtype=torch.float32)
    expected = torch.stack([EvalTransform(SPEC)(image) for image in split.images])
    assert torch.allclose(augment(split.images[:], neutral), expected, atol=1e-4)


def test_each_augmentation_step_matches_torchvision():
    x = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    per_image = lambda fn, values: torch.stack([fn(x[i], v) for i, v in enumerate(values)])  # noqa: E731
    close = lambda a, b: (a - b).abs().max().item() < 1e-5  # noqa: E731
    factors = torch.tensor([0.7, 1.3, 1.0, 0.9])
    assert close(transforms._contrast(x, factors.view(-1, 1, 1, 1)),
                 per_image(TF.adjust_contrast, factors.tolist()))
    assert close(transforms._saturation(x, factors.view(-1, 1, 1, 1)),
                 per_image(TF.adjust_saturation, factors.tolist()))
    assert close(transforms._brightness(x, factors.view(-1, 1, 1, 1)),
                 per_image(TF.adjust_brightness, factors.tolist()))
    hues = torch.tensor([-0.1, 0.05, 0.0, 0.08])
    assert close(transforms._hue(x, hues), per_image(TF.adjust_hue, hues.tolist()))
    sigmas = torch.tensor([[0.1], [0.5], [1.0], [0.7]])
    assert close(transforms._blur(x, sigmas), per_image(lambda im, s: TF.gaussian_blur(im, [3, 3], [s[0]] * 2),
                                                         sigmas.tolist()))
    # Flip, rotation and translation as one warp; at the edges it reads the real neighbouring
    # pixels (or black) where torchvision's separate steps clamp, so compare inside.
    none, no_shift = torch.zeros(4, 1), torch.zeros(4, 2)
    assert close(transforms._warp(x, none, none, no_shift), x)
    assert close(transforms._warp(x, torch.ones(4, 1), none, no_shift), x.flip(-1))
    assert close(transforms._warp(x, none, none, torch.tensor([[3.0, -2.0]] * 4)),
                 per_image(lambda im, _: TF.affine(im, 0.0, [3, -2], 1.0, [0.0, 0.0]), x))
    turned = per_image(lambda im, _: TF.rotate(im, 10.0, TF.InterpolationMode.BILINEAR), x)
    away_from_corners = (..., slice(8, -8), slice(8, -8))  # 10 degrees uncover up to 8 px there
    assert close(transforms._warp(x, none, torch.full((4, 1), 10.0), no_shift)[away_from_corners],
                 turned[away_from_corners])


# --- early stopping ----------------------------------------------------------------------------

def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=3, min_delta=0.1)
    # loss:        1.0   0.95 (< delta)  0.85 (new best)  0.80  0.79  0.76 (still < 0.75 needed)
    losses = [1.0, 0.95, 0.85, 0.80, 0.79, 0.76]
    improved = [stopper.step(v) for v in losses[:5]]
    assert improved == [True, False, True, False, False]
    assert stopper.best == 0.85 and stopper.bad_epochs == 2 and not stopper.should_stop
    assert stopper.step(losses[5]) is False
    assert stopper.should_stop and stopper.bad_epochs == 3


def test_early_stopping_never_stops_while_improving():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    for i in range(50):
        assert stopper.step(10.0 - 0.1 * i)
        assert not stopper.should_stop


def test_early_stopping_state_round_trip():
    stopper = EarlyStopping(patience=2, min_delta=0.0)
    for v in (3.0, 2.0, 2.5):
        stopper.step(v)
    restored = EarlyStopping(patience=2, min_delta=0.0)
    restored.load_state_dict(stopper.state_dict())
    assert restored.step(2.0) is False  # equal is not better
    assert restored.should_stop


# --- runs on tiny data ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from training.synthetic import generate

    return generate(tmp_path_factory.mktemp("small") / "data", images_per_class=6, seed=3)


RESUME_MODEL = "resnet34_modified"  # dropout draws from the global RNG: the resume must restore it
RESUME_EPOCHS = 2
# One thread per run: the two runs go side by side on small machines, with equal arithmetic.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}


def _train_args(data: Path, out: Path) -> list[str]:
    # --step-size 1: the learning rate drops after every epoch, so a scheduler that is not
    # restored on resume trains the resumed epoch at the wrong rate and the runs differ.
    return ["-m", "training.run", "--data", str(data), "--models", RESUME_MODEL,
            "--epochs", str(RESUME_EPOCHS), "--image-size", str(TINY_SIZE), "--batch-size", "8",
            "--step-size", "1", "--workers", "0", "--out", str(out)]


def _killed_after_first_checkpoint(args: list[str], last_pt: Path) -> subprocess.CompletedProcess:
    """Start a run and SIGKILL it as soon as it has finished an epoch (last.pt exists)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **SINGLE_THREAD}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not last_pt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture(scope="module")
def resume_runs(small_data, tmp_path_factory):
    """(uninterrupted run folder, killed-then-resumed run folder, the killed epoch)."""
    base = tmp_path_factory.mktemp("resume")
    full, resumed = base / "full", base / "resumed"
    last_pt = resumed / RESUME_MODEL / "last.pt"
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted run and the doomed one, side by side
        full_job = pool.submit(run_python, _train_args(small_data, full), env=SINGLE_THREAD, timeout=600)
        killed = _killed_after_first_checkpoint(_train_args(small_data, resumed), last_pt)
        full_result = full_job.result()
    assert full_result.returncode == 0, full_result.stderr
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    killed_epoch = torch.load(last_pt, weights_only=True)["epoch"]
    assert killed_epoch < RESUME_EPOCHS, "the run finished before it could be killed"
    assert not (resumed / RESUME_MODEL / "report.json").exists()
    again = run_python(["-m", "training.run", "--resume", str(resumed)], env=SINGLE_THREAD, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming after epoch {killed_epoch}" in again.stdout
    return full, resumed, killed_epoch


def _without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resume_after_kill_matches_an_uninterrupted_run(resume_runs):
    full, resumed, killed_epoch = resume_runs
    assert 1 <= killed_epoch < RESUME_EPOCHS
    for name in ("best.pt", "last.pt"):
        a = torch.load(full / RESUME_MODEL / name, weights_only=True)
        b = torch.load(resumed / RESUME_MODEL / name, weights_only=True)
        assert a["epoch"] == b["epoch"]
        assert a["model_state"].keys() == b["model_state"].keys()
        for key, tensor in a["model_state"].items():
            assert torch.equal(tensor, b["model_state"][key]), f"{name}: {key} differs"
    a = torch.load(full / RESUME_MODEL / "last.pt", weights_only=True)
    b = torch.load(resumed / RESUME_MODEL / "last.pt", weights_only=True)
    assert a["epoch"] == RESUME_EPOCHS and a["finished"] and b["finished"]
    assert _without_seconds(a["history"]) == _without_seconds(b["history"])
    assert [row["lr"] for row in b["history"]] == pytest.approx([6e-4, 6e-5])  # the schedule went on
    assert a["scheduler_state"] == b["scheduler_state"]
    assert a["early_stopping"] == b["early_stopping"]
    for index, state in a["optimizer_state"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer_state"]["state"][index][key]))

    def history_csv(run):
        with open(run / RESUME_MODEL / "history.csv") as f:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    assert history_csv(full) == history_csv(resumed)
    assert len(history_csv(full)) == RESUME_EPOCHS
    report_a = json.loads((full / RESUME_MODEL / "report.json").read_text())
    report_b = json.loads((resumed / RESUME_MODEL / "report.json").read_text())
    for key in ("best_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "per_class"):
        assert report_a[key] == report_b[key], key


def test_resume_refuses_changed_settings(resume_runs):
    full, _, _ = resume_runs
    from training.run import main

    assert main(["--resume", str(full), "--epochs", "9"]) == 2


@pytest.fixture(scope="module")
def spied_run(small_data, tmp_path_factory):
    """Three epochs with a test split and a learning rate that drops every epoch, recording the
    augmentation parameters every training batch was drawn with (the real ones, passed on)."""
    from training.run import main

    drawn: list[torch.Tensor] = []
    original = TrainAugment.__call__

    def spy(self, images, parameters):
        drawn.append(parameters.clone())
        return original(self, images, parameters)

    run_dir = tmp_path_factory.mktemp("spied") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainAugment, "__call__", spy)
        assert main(["--data", str(small_data), "--models", "resnet34", "--epochs", "3",
                     "--step-size", "1", "--gamma", "0.5", "--test-fraction", "0.2",
                     "--image-size", str(TINY_SIZE), "--batch-size", "8", "--workers", "0",
                     "--out", str(run_dir)]) == 0
    steps = len(drawn) // 3
    return run_dir, [torch.cat(drawn[e * steps:(e + 1) * steps]) for e in range(3)]


def test_every_epoch_draws_fresh_augmentation_in_a_real_run(spied_run):
    _, epochs = spied_run
    images = len(json.loads((spied_run[0] / "splits.json").read_text())["train"])
    assert all(len(e) == images for e in epochs)
    # Sorted rows compare the draws whatever order the sampler shuffled the images into: a
    # trainer that never moved the training set to the next epoch repeats epoch 1's draws.
    rows = [sorted(map(tuple, e.tolist())) for e in epochs]
    assert rows[0] != rows[1] and rows[1] != rows[2] and rows[0] != rows[2]


def test_the_learning_rate_schedule_steps_every_step_size_epochs(spied_run):
    run_dir, _ = spied_run
    last = torch.load(run_dir / "resnet34" / "last.pt", weights_only=True)
    assert [row["lr"] for row in last["history"]] == pytest.approx([6e-4, 3e-4, 1.5e-4])
    assert last["optimizer_state"]["param_groups"][0]["lr"] == pytest.approx(7.5e-5)  # after epoch 3


def test_a_run_with_a_test_split_reports_test_metrics(spied_run):
    run_dir, _ = spied_run
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["test"] and not {p for p, _ in splits["test"]} & {p for s in ("train", "val") for p, _ in splits[s]}
    report = json.loads((run_dir / "resnet34" / "report.json").read_text())
    best = checkpoint.load(run_dir / "resnet34" / "best.pt")
    spec = checkpoint.preprocessing_of(best)
    model = rebuild_model(best)
    images = torch.stack([EvalTransform(spec)(pixel_tensor(p, spec)) for p, _ in splits["test"]])
    labels = torch.tensor([label for _, label in splits["test"]])
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert report["test_accuracy"] == pytest.approx(accuracy)
    assert sum(c["support"] for c in report["test_per_class"].values()) == len(splits["test"])
    table = (run_dir / "comparison.md").read_text()
    assert "## Test" in table and f"{report['test_accuracy']:.4f}" in table.split("## Test")[1]


@pytest.mark.parametrize("name", EASY_MODELS)
def test_training_learns_easy_data(easy_run, name):
    report = json.loads((easy_run / name / "report.json").read_text())
    history = torch.load(easy_run / name / "last.pt", weights_only=True)["history"]
    # (a later epoch, not the last: with 12 batches of 8 one epoch's loss may jump)
    assert min(row["train_loss"] for row in history[1:]) < history[0]["train_loss"]
    assert report["val_accuracy"] >= 0.9  # chance is 0.5


@pytest.fixture(scope="module")
def early_stopped_run(small_data, tmp_path_factory):
    """A run that stops early: settings from a YAML file (lr written as 6e-4), one from a flag."""
    from training.run import main

    base = tmp_path_factory.mktemp("early")
    config = base / "settings.yaml"
    config.write_text("models: resnet34\nepochs: 9\nlr: 6e-4\npatience: 1\nmin_delta: 100\n"
                      f"image_size: {TINY_SIZE}\nbatch_size: 8\nworkers: 0\n")
    run_dir = base / "run"
    assert main(["--config", str(config), "--data", str(small_data), "--epochs", "5",
                 "--out", str(run_dir)]) == 0
    return run_dir


def test_early_stopping_in_a_real_run_keeps_the_best_weights(early_stopped_run):
    run_dir = early_stopped_run
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["patience"], saved["min_delta"]) == (5, 6e-4, 1, 100)
    model_dir = run_dir / "resnet34"
    with open(model_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    # Epoch 1 improves on infinity; with min_delta 100 nothing improves after it, patience 1.
    assert [int(r["epoch"]) for r in history] == [1, 2]
    report = json.loads((model_dir / "report.json").read_text())
    assert report["best_epoch"] == 1 and report["epochs_run"] == 2 and report["stopped_early"]
    best = torch.load(model_dir / "best.pt", weights_only=True)
    last = torch.load(model_dir / "last.pt", weights_only=True)
    assert best["epoch"] == 1 and last["epoch"] == 2
    # best.pt holds epoch 1's weights, not the last ones.
    assert any(not torch.equal(best["model_state"][k], last["model_state"][k]) for k in best["model_state"])
    # The report's metrics are the best epoch's, recomputed from best.pt.
    row = history[0]
    assert report["val_loss"] == pytest.approx(float(row["val_loss"]), abs=1e-6)
    assert report["val_accuracy"] == pytest.approx(float(row["val_accuracy"]))
    assert report["train_loss"] == pytest.approx(float(row["train_loss"]))
    assert report["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    assert float(history[1]["val_loss"]) != pytest.approx(float(row["val_loss"]), abs=1e-6)
    val_loss, accuracy, tolerance = _evaluate_checkpoint(best, run_dir, label_smoothing=saved["label_smoothing"])
    assert val_loss == pytest.approx(report["val_loss"], abs=tolerance)
    assert accuracy == pytest.approx(report["val_accuracy"])


# --- checkpoints ------------------------------------------------------------------------------------

def _evaluate_checkpoint(ckpt: dict, run_dir: Path, label_smoothing: float):
    """Validation loss and accuracy of a checkpoint rebuilt on its own, on the run's val split,
    in the run's precision (bfloat16 autocast where the CPU has it natively), and how closely the
    loss may match the report's (bfloat16 results move with the batch's composition)."""
    model = rebuild_model(ckpt)
    splits = json.loads((run_dir / "splits.json").read_text())
    spec = checkpoint.preprocessing_of(ckpt)
    transform = EvalTransform(spec)
    images = torch.stack([transform(pixel_tensor(path, spec)) for path, _ in splits["val"]])
    labels = torch.tensor([label for _, label in splits["val"]])
    precision = Precision(torch.device("cpu"), json.loads((run_dir / "config.json").read_text())["precision"])
    with torch.no_grad(), precision.autocast():
        logits = model(images).float()
    loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    tolerance = 5e-3 if precision.enabled else 1e-5
    return loss.item(), (logits.argmax(1) == labels).float().mean().item(), tolerance


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoints_are_self_describing(trained_run, name):
    ckpt = torch.load(trained_run / name / "best.pt", map_location="cpu", weights_only=True)
    splits = json.loads((trained_run / "splits.json").read_text())
    assert ckpt["architecture"] == name
    assert ckpt["class_names"] == splits["class_names"]
    assert ckpt["format"] == checkpoint.FORMAT_VERSION == 2
    assert ckpt["architecture_spec"] == ARCHITECTURES[name].to_dict()
    assert ckpt["preprocessing"] == {"input_size": [3, TINY_SIZE, TINY_SIZE], "interpolation": "bilinear",
                                     "crop_pct": 1.0, "crop_mode": "squash",
                                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    # The trainer records the spec it used in the report too.
    assert json.loads((trained_run / name / "report.json").read_text())["preprocessing"] == ckpt["preprocessing"]
    # The checkpoint alone rebuilds the model that produced the report's numbers.
    report = json.loads((trained_run / name / "report.json").read_text())
    config = json.loads((trained_run / "config.json").read_text())
    val_loss, accuracy, tolerance = _evaluate_checkpoint(ckpt, trained_run, config["label_smoothing"])
    assert val_loss == pytest.approx(report["val_loss"], abs=tolerance)
    assert accuracy == pytest.approx(report["val_accuracy"])


def test_last_checkpoint_holds_everything_to_continue(trained_run):
    last = torch.load(trained_run / "resnet34" / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model_state", "optimizer_state", "scheduler_state", "early_stopping", "rng",
                "history", "epoch", "finished", "architecture", "class_names"):
        assert key in last, key
    assert last["optimizer_state"]["state"], "AdamW moments are saved"
    assert last["epoch"] == 1 and len(last["history"]) == 1


class NotAWeight:
    """Any object that is not plain data: a weights_only loader must refuse to build it."""


def test_checkpoint_load_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "junk.pt")


def test_checkpoint_rebuilds_the_spec_it_stores_not_the_registry(trained_run, monkeypatch):
    ckpt = checkpoint.load(trained_run / "resnet34_modified" / "best.pt")
    # The registry changes after training (say, another head width): the checkpoint still
    # rebuilds the network it was trained as, with its weights.
    monkeypatch.setitem(ARCHITECTURES, "resnet34_modified",
                        dataclasses.replace(ARCHITECTURES["resnet34_modified"], head_width=64, dropout=0.1))
    model = rebuild_model(ckpt)
    assert model.arch.head_width == 512 and model.fc[0].out_features == 512
    assert model.arch.dropout == 0.4 and model.fc[3].p == 0.4
    assert torch.equal(model.state_dict()["fc.0.weight"], ckpt["model_state"]["fc.0.weight"])


def test_format_1_checkpoints_still_load_and_unknown_formats_are_refused(trained_run):
    ckpt = checkpoint.load(trained_run / "resnet34" / "best.pt")
    v1 = {k: v for k, v in ckpt.items() if k not in ("architecture_spec", "preprocessing")}
    v1.update(format=1, image_size=[TINY_SIZE, TINY_SIZE], mean=[0.5] * 3, std=[0.25] * 3)
    assert checkpoint.preprocessing_of(v1) == Preprocessing(input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
    old, new = rebuild_model(v1), rebuild_model(ckpt)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(old(x), new(x))
    with pytest.raises(CheckpointError, match="format 3 is not one this version reads") as info:
        rebuild_model({**ckpt, "format": 3})
    assert "\n" not in str(info.value)


def test_rebuild_model_errors(trained_run):
    ckpt = checkpoint.load(trained_run / "resnet34" / "best.pt")
    with pytest.raises(CheckpointError, match="lacks field.*preprocessing"):
        rebuild_model({k: v for k, v in ckpt.items() if k != "preprocessing"})
    with pytest.raises(CheckpointError, match="resnet34 model, not plain34"):
        rebuild_model(ckpt, expected_architecture="plain34")
    with pytest.raises(CheckpointError, match="unusable architecture spec.*activation 'gelu'"):
        rebuild_model({**ckpt, "architecture_spec": {**ckpt["architecture_spec"], "activation": "gelu"}})
    with pytest.raises(CheckpointError, match="do not fit the resnet34 architecture"):
        rebuild_model({**ckpt, "architecture_spec": ARCHITECTURES["resnet34_modified"].to_dict()})
    with pytest.raises(CheckpointError, match="do not fit"):  # 5 classes of weights, 3 names
        rebuild_model({**ckpt, "class_names": ckpt["class_names"][:3]})


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"a": torch.ones(2)}, path)
    checkpoint.save({"a": torch.zeros(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.equal(checkpoint.load(path)["a"], torch.zeros(2))
    # A write that fails half-way keeps the old file whole and leaves no temporary behind.
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.equal(checkpoint.load(path)["a"], torch.zeros(2))


# --- configuration ------------------------------------------------------------------------------------

def _config(argv):
    return config_from_args(argv)[0]


def test_config_is_frozen_after_validation():
    c = make_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.epochs = 3
    with pytest.raises(ConfigError, match="--freeze-epochs needs --init-weights"):
        make_config({"freeze_epochs": 2})
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        dataclasses.replace(c, epochs=0)  # every way of making one is checked


def test_help_shows_the_defaults_that_apply(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, value in QUICK_PROFILE.items():
        default = getattr(TrainConfig(), name)
        flag = "--" + name.replace("_", "-")
        assert f"default: {default}; quick profile (no --data): {value}" in text, flag
    lr_help = text.split("--lr LR")[-1].split("--weight-decay")[0]  # the option, not the usage line
    assert "default: 0.0006" in lr_help and "quick profile" not in lr_help  # the profile keeps lr


def test_defaults_are_the_recipe():
    c = TrainConfig()
    assert (c.lr, c.weight_decay, c.label_smoothing, c.step_size, c.gamma) == (6e-4, 1e-4, 0.05, 5, 0.1)
    assert (c.epochs, c.patience, c.batch_size, c.image_size, c.val_fraction, c.seed) == (30, 10, 50, 224, 0.2, 67)
    assert c.models == list(MODEL_NAMES)


def test_config_precedence(tmp_path):
    # No --data: the quick profile on top of the defaults.
    quick = _config([])
    for key, value in QUICK_PROFILE.items():
        assert getattr(quick, key) == value
    assert quick.lr == TrainConfig().lr
    # With --data: the recipe's defaults.
    assert _config(["--data", "x"]).image_size == 224 and _config(["--data", "x"]).epochs == 30
    # A config file beats the quick profile; flags beat the file.
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 7, "lr": 0.001, "models": "plain34,resnet34"}))
    from_file = _config(["--config", str(path)])
    assert (from_file.epochs, from_file.lr, from_file.image_size) == (7, 0.001, QUICK_PROFILE["image_size"])
    assert from_file.models == ["plain34", "resnet34"]
    flagged = _config(["--config", str(path), "--epochs", "2", "--models", "resnet34"])
    assert (flagged.epochs, flagged.lr, flagged.models) == (2, 0.001, ["resnet34"])
    # A file that names the data turns the quick profile off.
    path.write_text(json.dumps({"data": "somewhere", "batch-size": 16}))
    with_data = _config(["--config", str(path)])
    assert (with_data.image_size, with_data.batch_size, with_data.epochs) == (224, 16, 30)


def test_yaml_config_values_get_their_setting_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 6e-4\nweight_decay: 1e-5\nepochs: 3.0\nmodels: [resnet34]\n")
    c = _config(["--config", str(path)])
    assert (c.lr, c.weight_decay, c.epochs, c.models) == (6e-4, 1e-5, 3, ["resnet34"])
    assert isinstance(c.lr, float) and isinstance(c.epochs, int)


@pytest.mark.parametrize("content, suffix, message", [
    ('{"epochs": 3, "learning_rate": 1}', ".json", "unknown setting.*learning_rate"),
    ('{"epochs": ', ".json", "cannot parse config file"),
    ("epochs: [1, 2", ".yaml", "cannot parse config file"),
    ("[1, 2]", ".json", "must hold a mapping"),
    ('{"epochs": "ten"}', ".json", "epochs .* must be a whole number, got 'ten'"),
    ("epochs: 2.5\n", ".yaml", "epochs .* must be a whole number, got 2.5"),
    ("lr: fast\n", ".yaml", "lr .* must be a number"),
    ("epochs: 0\n", ".yaml", "epochs must be at least 1"),
    ("models: resnet50\n", ".yaml", "unknown model.*resnet50"),
    ("val_fraction: 1.5\n", ".yaml", "val_fraction"),
])
def test_bad_config_files_are_clear_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        _config(["--config", str(path)])
    assert "\n" not in str(info.value)


def test_bad_settings_exit_2_with_one_line(tmp_path, capsys):
    from training.run import main

    cases = [
        ["--config", str(tmp_path / "missing.yaml")],
        ["--models", "resnet34,alexnet"],
        ["--image-size", "16"],
        ["--labels-csv", "labels.csv"],
    ]
    for argv in cases:
        assert main([*argv, "--out", str(tmp_path / "run")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert not (tmp_path / "run").exists()


# --- reports --------------------------------------------------------------------------------------

def test_history_csv_columns(trained_run):
    for name in MODEL_NAMES:
        with open(trained_run / name / "history.csv") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        assert tuple(reader.fieldnames) == HISTORY_COLUMNS
        assert tuple(HISTORY_COLUMNS) == ("epoch", "lr", "train_loss", "train_accuracy", "val_loss",
                                          "val_accuracy", "seconds")
        assert [int(r["epoch"]) for r in rows] == [1]
        assert float(rows[0]["lr"]) == pytest.approx(6e-4)
        assert all(np.isfinite(float(v)) for v in rows[0].values())


def test_pictures_exist(trained_run):
    for name in MODEL_NAMES:
        for picture in ("curves.png", "confusion.png"):
            with Image.open(trained_run / name / picture) as img:
                assert img.format == "PNG" and min(img.size) >= 200


def test_report_json(trained_run):
    splits = json.loads((trained_run / "splits.json").read_text())
    for name in MODEL_NAMES:
        report = json.loads((trained_run / name / "report.json").read_text())
        for key in ("best_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                    "per_class", "parameters"):
            assert key in report, (name, key)
        assert report["parameters"] == EXPECTED_PARAMETERS[name]
        assert report["best_epoch"] == 1
        assert 0 <= report["val_accuracy"] <= 1 and 0 <= report["train_accuracy"] <= 1
        assert set(report["per_class"]) == set(splits["class_names"])
        for metrics in report["per_class"].values():
            assert set(metrics) >= {"precision", "recall", "f1", "support"}
            assert all(0 <= metrics[k] <= 1 for k in ("precision", "recall", "f1"))
        assert sum(m["support"] for m in report["per_class"].values()) == len(splits["val"])
        # Recall weighted by support is the accuracy.
        recalled = sum(m["recall"] * m["support"] for m in report["per_class"].values())
        assert recalled / len(splits["val"]) == pytest.approx(report["val_accuracy"])


def test_comparison_lists_the_models(trained_run):
    text = (trained_run / "comparison.md").read_text()
    validation, training = text.split("## Validation")[1], text.split("## Training")[1]
    for name in MODEL_NAMES:
        display = ARCHITECTURES[name].display_name
        report = json.loads((trained_run / name / "report.json").read_text())
        row = next(line for line in validation.splitlines() if line.startswith(f"| {display} |"))
        assert f"{report['val_accuracy']:.4f}" in row and f"{report['val_loss']:.4f}" in row
        row = next(line for line in training.splitlines() if line.startswith(f"| {display} |"))
        assert f"{EXPECTED_PARAMETERS[name]:,}" in row
    # One run: Wilson intervals and a McNemar test per pair, one sentence each.
    assert "Wilson" in text and text.count("McNemar exact test") == 3
    claims = text.split("## What the data supports")[1].split("\n## ")[0]
    assert len([line for line in claims.splitlines() if line.startswith("- ")]) == 3


def test_parameter_count_in_the_report_is_the_models(trained_run):
    ckpt = checkpoint.load(trained_run / "resnet34_modified" / "best.pt")
    assert count_parameters(rebuild_model(ckpt)) == EXPECTED_PARAMETERS["resnet34_modified"]


# --- precision on the CPU ---------------------------------------------------------------------

@pytest.mark.parametrize("flags, mode, expected", [
    ({"avx2"}, "auto", (False, False)),  # emulated bfloat16 is slower than float32: as before
    ({"avx2", "avx512_bf16"}, "auto", (True, True)),
    ({"amx_bf16"}, "auto", (True, True)),
    ({"amx_bf16"}, "float32", (False, False)),
    ({"avx2"}, "bfloat16", (True, True)),
])
def test_cpu_precision_follows_native_bfloat16(monkeypatch, flags, mode, expected):
    from training import engine

    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset(flags))
    precision = engine.Precision(torch.device("cpu"), mode)
    assert (precision.enabled, precision.channels_last) == expected
    with precision.autocast():
        y = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert y.dtype == (torch.bfloat16 if expected[0] else torch.float32)
    assert precision.layout(torch.ones(2, 3, 4, 4)).is_contiguous(
        memory_format=torch.channels_last if expected[1] else torch.contiguous_format)


@pytest.mark.parametrize("device, flags, mode, chosen", [
    ("cpu", {"avx2", "avx512_bf16"}, "auto", "bfloat16 autocast + channels_last: this CPU has avx512_bf16"),
    ("cpu", {"amx_bf16", "avx512_bf16"}, "auto",
     "bfloat16 autocast + channels_last: this CPU has amx_bf16 and avx512_bf16"),
    ("cpu", {"avx2"}, "auto", "float32 + contiguous layout: this CPU has no native bfloat16 "
                              "(avx512_bf16, amx_bf16), so float32 is faster"),
    ("cpu", {"amx_bf16"}, "float32", "float32 + contiguous layout: --precision float32"),
    ("cpu", {"avx2"}, "bfloat16", "bfloat16 autocast + channels_last: --precision bfloat16"),
    ("mps", {"amx_bf16"}, "auto", "float32 + contiguous layout: autocast runs on cuda and cpu only, not mps"),
])
def test_the_precision_chosen_says_why(monkeypatch, device, flags, mode, chosen):
    from training import engine

    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset(flags))
    assert engine.Precision(torch.device(device), mode).chosen() == chosen


@pytest.mark.slow  # trains a model
def test_a_bfloat16_run_trains_and_records_its_precision(tiny_dataset, tmp_path, capsys):
    from training.run import main

    out = tmp_path / "run"
    assert main(["--data", str(tiny_dataset), "--models", "resnet34", "--epochs", "1",
                 "--image-size", str(TINY_SIZE), "--batch-size", "8", "--workers", "0",
                 "--precision", "bfloat16", "--out", str(out), "--no-cache"]) == 0
    saved = json.loads((out / "config.json").read_text())
    chosen = "bfloat16 autocast + channels_last: --precision bfloat16"
    assert saved["precision"] == "bfloat16" and saved["chosen"] == {"precision": chosen}
    log = capsys.readouterr().out
    assert f"\nPrecision: {chosen}\n" in log
    assert re.search(r"\nImages: decoded \d+ files in memory in [\d.]+ s\n", log)
    report = json.loads((out / "resnet34" / "report.json").read_text())
    assert np.isfinite(report["val_loss"])
    state = checkpoint.load(out / "resnet34" / "best.pt")["model_state"]
    assert all(v.dtype != torch.bfloat16 for v in state.values())  # autocast: weights stay float32

"""Shared fixtures: a tiny generated dataset, a run trained on it, and its exported models.

Everything heavy is session-scoped and built once; tests that change files copy them first.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# The commands under test serve ONNX Runtime unless a test asks for another engine: answers do
# not depend on which engine a start-up timing picked (tests/test_engines.py tests that).
os.environ.setdefault("RESNET_TRIO_ENGINE", "onnxruntime")

TINY_SIZE = 32  # px: the smallest image size training accepts, fast on CPU

# Fixtures that train models (or start the app on trained models): a test that uses one, even
# through another fixture, is marked slow, so that the quick tier (-m "not slow and not browser
# and not container") stays within minutes. Tests slow on their own carry @pytest.mark.slow.
TRAINING_FIXTURES = {
    "trained_run", "easy_run", "seeds_run", "folds_run", "ddp_run", "quadrant_models", "error_runs",
    "ema_runs", "resume_runs", "spied_run", "early_stopped_run",
}


# Tests that load OpenVINO in the test process need a pytest process of their own: beside the
# rest of the suite (torch's forked DataLoader workers, many loaded models) the test process
# itself crashed (SIGSEGV). Collected together with other files they are left out with a note;
# `make test` runs them in a second process.
OPENVINO_IN_PROCESS = ("test_engines.py",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    apart = [item for item in items if item.path.name in OPENVINO_IN_PROCESS]
    if apart and len(apart) < len(items):
        config.hook.pytest_deselected(items=apart)
        items[:] = [item for item in items if item.path.name not in OPENVINO_IN_PROCESS]
        warnings.warn(pytest.PytestWarning(
            f"{len(apart)} OpenVINO tests left out: run them apart (python -m pytest "
            f"tests/{OPENVINO_IN_PROCESS[0]}), as make test does"))


@pytest.fixture(scope="session", autouse=True)
def decoded_image_cache(tmp_path_factory) -> Path:
    """Runs in tests (and the commands they start) keep decoded images here, not in ~/.cache."""
    folder = tmp_path_factory.mktemp("decoded-image-cache")
    os.environ["RESNET_TRIO_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The built-in dataset's generator at 12 images per class (plus its two broken files)."""
    from training.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "tiny", images_per_class=12)


@pytest.fixture(scope="session")
def ood_images(tmp_path_factory) -> Path:
    """The built-in out-of-distribution set's generator at 10 images."""
    from training.synthetic import generate_ood

    return generate_ood(tmp_path_factory.mktemp("data") / "ood", images=10)


@pytest.fixture(scope="session")
def trained_run(tiny_dataset, ood_images, tmp_path_factory) -> Path:
    """All three models trained for one short epoch: real checkpoints, real BN statistics."""
    from training.run import main

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-run"
    code = main(["--data", str(tiny_dataset), "--epochs", "1", "--image-size", str(TINY_SIZE),
                 "--batch-size", "8", "--workers", "0", "--out", str(run_dir),
                 "--ood-data", str(ood_images)])
    assert code == 0
    return run_dir


def write_easy_dataset(root: Path, per_class: int = 60) -> Path:
    """Two classes a working network tells apart at once: reddish and bluish noisy squares."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


EASY_MODELS = ("resnet34", "resnet34_modified")


@pytest.fixture(scope="session")
def easy_run(tmp_path_factory) -> Path:
    """Two models trained for a few epochs on easy data: decisive, unlike the one-epoch tiny run."""
    from training.run import main

    base = tmp_path_factory.mktemp("easy")
    run_dir = base / "run"
    code = main(["--data", str(write_easy_dataset(base / "data")), "--models", ",".join(EASY_MODELS),
                 "--epochs", "4", "--image-size", str(TINY_SIZE), "--batch-size", "8",
                 "--val-fraction", "0.25", "--workers", "0", "--out", str(run_dir)])
    assert code == 0
    return run_dir


@pytest.fixture(scope="session")
def exported_models(trained_run, tmp_path_factory) -> Path:
    """The tiny run exported to ONNX (with manifest, parity files and examples)."""
    from export.run import main

    out = tmp_path_factory.mktemp("models") / "models"
    assert main(["--run", str(trained_run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def app_url(exported_models):
    """``python -m serve.app`` serving the exported models, started once in a child process."""
    from serve.launch import running_app

    with running_app(exported_models) as url:
        yield url


def run_python(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 600):
    """Run ``python <args>`` in a subprocess with the project importable."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)

"""Where the models look: on images whose evidence sits in one quadrant, the exported Grad-CAM
heatmap (FP32 and INT8) peaks in that quadrant, and the run shows it in heatmaps.png."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_python
from serve.predictor import create_session

SIZE = 128  # layer4 is 4 x 4 at 128 px: 2 x 2 heatmap cells per quadrant
CENTRES = {(0, 0): (32, 32), (0, 1): (32, 96), (1, 0): (96, 32), (1, 1): (96, 96)}  # (row, col): (y, x)
RED = (220, 40, 40)


def disc_image(centre, rng, colour=RED) -> Image.Image:
    """Grey noise with one red disc (the "disc" class's evidence, in one place), or without
    (``centre`` None: the "plain" class)."""
    pixels = rng.normal(128, 20, (SIZE, SIZE, 3))
    if centre is not None:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        pixels[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 16 ** 2] = colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def quadrant_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("quadrants")
    rng = np.random.default_rng(0)
    for name in ("disc", "plain"):
        (base / "data" / name).mkdir(parents=True)
        for i in range(60):
            centre = tuple(int(v) for v in rng.integers(18, SIZE - 18, 2)) if name == "disc" else None
            disc_image(centre, rng).save(base / "data" / name / f"{i:03d}.png")
    train = run_python(["-m", "training.run", "--data", str(base / "data"), "--models", "resnet34",
                        "--epochs", "5", "--image-size", str(SIZE), "--batch-size", "16",
                        "--val-fraction", "0.25", "--workers", "0", "--out", str(base / "run")])
    assert train.returncode == 0, train.stderr[-2000:]
    export = run_python(["-m", "export.run", "--run", str(base / "run"), "--out", str(base / "models"),
                         "--quantize", "int8"])
    assert export.returncode == 0, export.stderr[-2000:]
    return base


def _input(image: Image.Image, predictor_path: Path) -> np.ndarray:
    from serve.predictor import Predictor

    return Predictor(predictor_path).preprocess(image)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_heatmap_peaks_where_the_evidence_is(quadrant_models, precision):
    models = quadrant_models / "models"
    path = models / ("resnet34.onnx" if precision == "fp32" else "resnet34.int8.onnx")
    session = create_session(path)
    classes = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
    rng = np.random.default_rng(1)
    disc = classes.index("disc")
    for quadrant, centre in CENTRES.items():
        x = _input(disc_image(centre, rng), path)
        probabilities, heatmaps = session.run(["probabilities", "heatmaps"], {"image": x})
        assert int(probabilities[0].argmax()) == disc
        cam = heatmaps[0, disc]
        assert cam.shape == (4, 4)
        row, col = np.unravel_index(cam.argmax(), cam.shape)
        assert (row // 2, col // 2) == quadrant, (quadrant, cam)


def test_int8_heatmaps_correlate_with_fp32(quadrant_models):
    report = json.loads((quadrant_models / "models" / "resnet34.int8.json").read_text())
    assert report["validation"]["heatmap_correlation"] >= 0.9


def test_the_run_shows_where_each_model_looks(quadrant_models):
    picture = quadrant_models / "run" / "heatmaps.png"
    with Image.open(picture) as img:
        # A row per chosen validation image (2 per class), a column per model plus the image.
        assert img.width > 300 and img.height > 2 * 2 * 150

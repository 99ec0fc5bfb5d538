"""The Gradio app as a client uses it: a real server in a child process, called through
gradio_client's /classify, with good images, bad files and broken model folders."""
from __future__ import annotations

import io
import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import imaging
from serve.launch import free_port, running_app
from serve.predictor import Predictor
from conftest import run_python

STARTUP_TIMEOUT = 300


def classify(url: str, path) -> list[dict]:
    return Client(url, verbose=False).predict(handle_file(str(path)), api_name="/classify")


def direct(models_dir, image: Image.Image) -> dict[str, dict]:
    """Each model run in this process, without the app: name -> probabilities."""
    return {name: prediction.probabilities for name, prediction in direct_predictions(models_dir, image).items()}


def direct_predictions(models_dir, image: Image.Image) -> dict:
    manifest = json.loads((models_dir / "manifest.json").read_text())
    return {e["name"]: Predictor(models_dir / e["file"]).predict(image) for e in manifest["models"]}


def assert_matches_direct(results: list[dict], expected: dict[str, dict]) -> None:
    assert [r["model"] for r in results] == list(expected)
    for r in results:
        probs = r["confidences"]
        assert list(probs) == list(expected[r["model"]])
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert probs == pytest.approx(expected[r["model"]], abs=1e-5)
        assert r["top_class"] == max(probs, key=probs.get)
        assert r["milliseconds"] > 0 and r["precision"] == "fp32" and r["display_name"]


def test_classifies_an_example_like_the_predictor(app_url, exported_models):
    manifest = json.loads((exported_models / "manifest.json").read_text())
    example = exported_models / manifest["examples"][0]
    results = classify(app_url, example)
    assert len(results) == 3
    assert_matches_direct(results, direct(exported_models, imaging.load_rgb(example)))


def test_results_carry_the_top_class_heatmap(app_url, exported_models):
    manifest = json.loads((exported_models / "manifest.json").read_text())
    example = exported_models / manifest["examples"][0]
    expected = direct_predictions(exported_models, imaging.load_rgb(example))
    for r in classify(app_url, example):
        entry = next(e for e in manifest["models"] if e["name"] == r["model"])
        heatmap = np.asarray(r["heatmap"])
        assert heatmap.shape == tuple(entry["heatmap_size"])  # h x w of the file's heatmaps output
        assert heatmap.min() >= 0 and heatmap.max() <= 1
        prediction = expected[r["model"]]
        top = list(prediction.probabilities).index(r["top_class"])
        raw = prediction.heatmaps[top]
        np.testing.assert_allclose(heatmap, raw / raw.max() if raw.max() > 0 else raw, atol=1e-4)


def test_the_page_draws_the_chosen_class_heatmap_over_the_image(exported_models):
    from imaging.heatmap import overlay
    from serve.catalog import load_catalog
    from serve.gate import Gate
    from serve.service import Service, fit_preview

    catalog = load_catalog(exported_models)
    service = Service(catalog, Gate(1, 1))
    example = exported_models / json.loads((exported_models / "manifest.json").read_text())["examples"][0]
    image = imaging.load_rgb(example)
    small = fit_preview(image)
    assert max(small.size) == 320
    chosen = catalog.class_names[-1]
    drawn = service.classify_now(example, chosen, overlays=True).overlays
    for picture, predictor in zip(drawn, catalog.predictors):
        expected = overlay(small, predictor.predict(image).heatmap(chosen))
        assert picture.size == small.size
        np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))
    # Each model's own top class by default: the pictures of the results' own heatmaps.
    answer = service.classify_now(example, None, overlays=True)
    for picture, predictor in zip(answer.overlays, catalog.predictors):
        np.testing.assert_array_equal(np.asarray(picture), np.asarray(overlay(small, predictor.predict(image).heatmap())))


def test_simultaneous_clients_all_get_answers(app_url, exported_models):
    example = exported_models / json.loads((exported_models / "manifest.json").read_text())["examples"][1]
    expected = direct(exported_models, imaging.load_rgb(example))
    with ThreadPoolExecutor(4) as pool:
        for results in pool.map(lambda _: classify(app_url, example), range(4)):
            assert_matches_direct(results, expected)


# --- bad input: a readable error, and the server keeps answering --------------------------------

def truncated_jpeg(path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def bomb_png(path):
    Image.new("1", (10_000, 9_000)).save(path)  # 90 M pixels in a few kB


@pytest.mark.parametrize("name, make, message", [
    ("notes.txt", lambda p: p.write_text("not an image at all\n"), "not an image"),
    ("photo.jpg", lambda p: p.write_bytes(b"\x00" * 300), "not an image"),
    ("truncated.jpg", truncated_jpeg, "unreadable image data"),
    ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
    ("bomb.png", bomb_png, "above the limit"),
])
def test_bad_file_gets_a_readable_error(app_url, exported_models, tmp_path, name, make, message):
    bad = tmp_path / name
    make(bad)
    with pytest.raises(Exception) as caught:
        classify(app_url, bad)
    assert "Cannot classify this file" in str(caught.value) and message in str(caught.value)
    assert "Traceback" not in str(caught.value)
    example = exported_models / json.loads((exported_models / "manifest.json").read_text())["examples"][0]
    assert len(classify(app_url, example)) == 3  # still serving


def animated_gif(path):
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((200, 30, 30), (30, 30, 200))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return frames[0]


def sixteen_bit_png(path):
    ramp = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(ramp, mode="I;16").save(path)
    return Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8), mode="L").convert("RGB")


def cmyk_jpeg(path):
    image = Image.new("CMYK", (50, 40), (10, 200, 30, 5))
    image.save(path, "JPEG", quality=95)
    return Image.open(path).convert("RGB")


def one_pixel(path):
    Image.new("RGB", (1, 1), (120, 50, 200)).save(path)
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("name, make", [
    ("animated.gif", animated_gif), ("deep.png", sixteen_bit_png), ("cmyk.jpg", cmyk_jpeg),
    ("dot.png", one_pixel),
])
def test_unusual_images_are_converted_and_classified(app_url, exported_models, tmp_path, name, make):
    path = tmp_path / name
    as_rgb = make(path)  # what the file should become: first frame, 8-bit RGB
    assert_matches_direct(classify(app_url, path), direct(exported_models, as_rgb))


# --- start-up -----------------------------------------------------------------------------------

def start(models, *args, timeout=STARTUP_TIMEOUT):
    """Run the app expecting it to refuse to start; returns (exit code, stderr lines)."""
    done = run_python(["-m", "serve.app", "--models", str(models), "--port", str(free_port()), *args],
                      timeout=timeout)
    return done.returncode, done.stderr.strip().splitlines()


def copy_models(exported_models, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(exported_models, target)
    return target


def edit_metadata(path, change):
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    change(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def refuse_missing_folder(tmp_path, models):
    return tmp_path / "nowhere", "does not exist"


def refuse_no_manifest(tmp_path, models):
    (models / "manifest.json").unlink()
    return models, "no manifest.json"


def refuse_empty_manifest(tmp_path, models):
    (models / "manifest.json").write_text(json.dumps({"models": [], "examples": []}))
    return models, "no fp32 models"


def refuse_corrupt_onnx(tmp_path, models):
    (models / "resnet34.onnx").write_bytes(b"this is not a protobuf" * 100)
    return models, "not a loadable ONNX model"


def refuse_without_metadata(tmp_path, models):
    edit_metadata(models / "plain34.onnx", lambda props: props.clear())
    return models, "lacks metadata"


def refuse_class_disagreement(tmp_path, models):
    edit_metadata(models / "resnet34_modified.onnx",
                  lambda props: props.update(class_names=json.dumps(json.loads(props["class_names"])[::-1])))
    return models, "disagree on class names"


@pytest.mark.parametrize("breakage", [
    refuse_missing_folder, refuse_no_manifest, refuse_empty_manifest, refuse_corrupt_onnx,
    refuse_without_metadata, refuse_class_disagreement,
])
def test_broken_models_folder_stops_start_up_in_one_line(exported_models, tmp_path, breakage):
    folder, message = breakage(tmp_path, copy_models(exported_models, tmp_path))
    code, lines = start(folder)
    assert code == 2  # the user's folder: a user mistake
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_int8_without_int8_models_stops_start_up(exported_models):
    code, lines = start(exported_models, "--precision", "int8")
    assert code == 2 and len(lines) == 1 and "no int8 models" in lines[0], lines


def test_port_in_use_stops_start_up(exported_models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_python(["-m", "serve.app", "--models", str(exported_models), "--port", str(port)],
                          timeout=STARTUP_TIMEOUT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and f"port {port}" in lines[0] and "--port" in lines[0], lines


@pytest.mark.parametrize("keep", [["resnet34"], ["plain34", "resnet34_modified"]])
def test_one_or_two_models_are_served(exported_models, tmp_path, keep):
    models = copy_models(exported_models, tmp_path)
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["models"] = [e for e in manifest["models"] if e["name"] in keep]
    (models / "manifest.json").write_text(json.dumps(manifest))
    example = models / manifest["examples"][0]
    with running_app(models, timeout=STARTUP_TIMEOUT) as url:
        results = classify(url, example)
    expected = {name: probs for name, probs in direct(models, imaging.load_rgb(example)).items()}
    assert_matches_direct(results, expected)
    assert [r["model"] for r in results] == keep


@pytest.mark.slow
def test_int8_models_are_served_when_asked_for(trained_run, tmp_path):
    models = tmp_path / "models"
    done = run_python(["-m", "export.run", "--run", str(trained_run), "--out", str(models),
                       "--quantize", "int8"], timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    example = models / json.loads((models / "manifest.json").read_text())["examples"][0]
    with running_app(models, "--precision", "int8", timeout=STARTUP_TIMEOUT) as url:
        results = classify(url, example)
    assert [r["precision"] for r in results] == ["int8"] * 3
    image = imaging.load_rgb(example)
    for r in results:
        expected = Predictor(models / f"{r['model']}.int8.onnx").predict(image).probabilities
        assert r["confidences"] == pytest.approx(expected, abs=1e-5)

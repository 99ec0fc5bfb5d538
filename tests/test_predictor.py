"""The torch-free predictor: preprocessing identical to training's validation transform, the same
answers as PyTorch, no torch needed, clear errors for bad model files."""
import io
import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import imaging
from conftest import ROOT, run_python
from serve.predictor import ModelFileError, Predictor
from training import checkpoint
from training.models import MODEL_NAMES
from training.transforms import EvalTransform, pixel_tensor

MODES = ("RGB", "RGBA", "P", "L", "CMYK", "I;16")
SIZES = ((1, 1), (1, 9), (9, 1), (32, 32), (33, 31), (127, 45), (640, 480), (4000, 300), (300, 1000))


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Noise in ``mode`` (noise makes every resampling error visible)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16), "I;16")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "P": 3}[mode]
    img = Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8),
                          "RGB" if mode == "P" else mode)
    if mode == "P":
        img = img.quantize(64)
        img.info["transparency"] = 3  # one palette entry is transparent
    return img


def _file_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "TIFF" if img.mode == "CMYK" else "PNG")
    return buffer.getvalue()


def tiny_onnx(path, input_size=(24, 40), metadata=None):
    """A small real ONNX classifier (mean colour -> softmax over 3 classes) with metadata."""
    h, w = input_size
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if metadata is None:
        metadata = {"class_names": json.dumps(["red", "green", "blue"]), "input_size": json.dumps([h, w]),
                    "mean": json.dumps([0.485, 0.456, 0.406]), "std": json.dumps([0.229, 0.224, 0.225]),
                    "architecture": "tiny", "display_name": "Tiny"}
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def predictor(exported_models):
    return Predictor(exported_models / "resnet34.onnx", threads=1)


@pytest.fixture(scope="module")
def non_square(tmp_path_factory):
    return Predictor(tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx"))


def _assert_same_input(predictor, img):
    size, spec, data = predictor.input_size, predictor.preprocessing, _file_bytes(img)
    expected = EvalTransform(spec)(pixel_tensor(data, spec)).numpy()  # training's path: file -> tensor
    got = predictor.preprocess(imaging.load_rgb(data))  # serving's: file -> Pillow -> numpy
    assert got.shape == (1, 3, *size) and got.dtype == np.float32
    assert float(np.abs(got[0] - expected).max()) <= 1e-5
    # An in-memory image of any mode goes the same way.
    in_memory = predictor.preprocess(img)
    assert float(np.abs(in_memory[0] - EvalTransform(spec)(pixel_tensor(img, spec)).numpy()).max()) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocessing_equals_the_validation_transform(predictor, mode, size):
    img = make_image(mode, *size, seed=100 * MODES.index(mode) + SIZES.index(size))
    assert img.mode == mode
    _assert_same_input(predictor, img)


@pytest.mark.parametrize("mode", MODES)
def test_preprocessing_parity_for_a_non_square_input(non_square, mode):
    assert non_square.input_size == (24, 40)
    for size in ((1, 1), (4000, 300), (40, 24), (24, 40)):
        _assert_same_input(non_square, make_image(mode, *size, seed=7))


def test_files_exported_with_the_older_input_size_key_still_load(non_square, tmp_path):
    # tiny_onnx writes input_size as [H, W] with no interpolation or crop keys, as files did
    # before the timm-style keys; the new form is [3, H, W] and reads the same.
    assert non_square.preprocessing.interpolation == "bilinear"
    current = dict(non_square.metadata, input_size=json.dumps([3, 24, 40]), interpolation="bilinear",
                   crop_mode="squash", crop_pct="1.0")
    assert Predictor(tiny_onnx(tmp_path / "new.onnx", metadata=current)).preprocessing == non_square.preprocessing
    bicubic = Predictor(tiny_onnx(tmp_path / "bicubic.onnx", metadata=dict(current, interpolation="bicubic")))
    img = make_image("RGB", 300, 170, seed=3)
    assert not np.array_equal(bicubic.preprocess(img), non_square.preprocess(img))  # the key is used
    with pytest.raises(ModelFileError, match="crop_mode 'center'"):
        Predictor(tiny_onnx(tmp_path / "center.onnx", metadata=dict(current, crop_mode="center")))


def test_non_square_input_keeps_height_and_width_apart(non_square):
    # Left half red, right half blue: after an exact resize to 24 x 40 the halves stay put.
    pixels = np.zeros((10, 100, 3), np.uint8)
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:] = (0, 0, 255)
    x = non_square.preprocess(Image.fromarray(pixels))[0]
    std = np.asarray([0.229, 0.224, 0.225])
    mean = np.asarray([0.485, 0.456, 0.406])
    np.testing.assert_allclose(x[:, 0, 0], (np.array([1, 0, 0]) - mean) / std, atol=1e-5)
    np.testing.assert_allclose(x[:, 23, 39], (np.array([0, 0, 1]) - mean) / std, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_top1_as_pytorch_on_every_validation_image(trained_run, exported_models, name):
    ckpt = checkpoint.load(trained_run / name / "best.pt")
    model = checkpoint.rebuild_model(ckpt)
    predictor = Predictor(exported_models / f"{name}.onnx")
    assert predictor.class_names == ckpt["class_names"]
    splits = json.loads((trained_run / "splits.json").read_text())
    assert splits["val"]
    spec = checkpoint.preprocessing_of(ckpt)
    assert predictor.preprocessing == spec
    paths = [path for path, _ in splits["val"]]
    with torch.no_grad():
        logits = model(torch.stack([EvalTransform(spec)(pixel_tensor(p, spec)) for p in paths]))
        references = torch.softmax(logits / ckpt["calibration"]["temperature"], 1)  # as exported
    for path, reference in zip(paths, references.numpy()):
        prediction = predictor.predict_file(path)
        assert prediction.top_class == ckpt["class_names"][int(reference.argmax())], path
        got = np.array([prediction.probabilities[c] for c in ckpt["class_names"]])
        np.testing.assert_allclose(got, reference, atol=1e-5)


def test_prediction_fields(predictor):
    prediction = predictor.predict(make_image("RGBA", 50, 40, seed=1))
    assert list(prediction.probabilities) == predictor.class_names
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.top_class == max(prediction.probabilities, key=prediction.probabilities.get)
    assert prediction.milliseconds > 0
    assert predictor.display_name == "ResNet-34" and predictor.name == "resnet34"
    assert predictor.precision == "fp32"
    batch = np.concatenate([predictor.preprocess(make_image("RGB", 9, 9, seed=s)) for s in range(3)])
    assert predictor.probabilities(batch).shape == (3, len(predictor.class_names))


def test_predict_file_rejects_bad_images(predictor):
    with pytest.raises(imaging.ImageError):
        predictor.predict_file(b"not an image")
    with pytest.raises(imaging.ImageError, match="above the limit"):
        predictor.predict_file(_file_bytes(make_image("L", 200, 200, seed=2)), max_pixels=1000)


BLOCKER = textwrap.dedent('''
    """Loaded at start-up from PYTHONPATH: make torch & co. impossible to import."""
    import sys

    BLOCKED = {"torch", "torchvision", "training", "export"}


    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not available here")
            return None


    sys.meta_path.insert(0, Blocker())
''')

CHILD = textwrap.dedent('''
    import json, sys
    try:
        import torch
    except ImportError:
        pass
    else:
        sys.exit("torch is importable: the blocker is not active")
    from serve.predictor import Predictor
    import common.datasets, common.metrics, common.confusion_image, common.run_layout, common.calibration  # noqa
    import serve.catalog, serve.evaluate  # noqa: the torch-free homes and the commands built on them
    predictor = Predictor(sys.argv[1])
    prediction = predictor.predict_file(sys.argv[2])
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {"torch", "torchvision", "training", "export"})
    print(json.dumps({"top": prediction.top_class, "probabilities": prediction.probabilities, "loaded": loaded}))
''')


def test_predictor_works_without_torch(exported_models, predictor, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    image = tmp_path / "photo.png"
    make_image("P", 70, 50, seed=3).save(image)
    result = run_python(["-c", CHILD, str(exported_models / "resnet34.onnx"), str(image)],
                        env={"PYTHONPATH": f"{tmp_path}:{ROOT}"}, timeout=120)
    assert result.returncode == 0, result.stderr
    child = json.loads(result.stdout)
    assert child["loaded"] == []
    expected = predictor.predict_file(image)
    assert child["top"] == expected.top_class
    for name, p in expected.probabilities.items():
        assert child["probabilities"][name] == pytest.approx(p, abs=1e-6)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Predictor(tmp_path / "absent.onnx")


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFileError, match="not a loadable ONNX model") as info:
        Predictor(path)
    assert "\n" not in str(info.value)


def test_truncated_model_file(exported_models, tmp_path):
    data = (exported_models / "resnet34.onnx").read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        Predictor(path)


def test_model_without_metadata(tmp_path):
    path = tiny_onnx(tmp_path / "bare.onnx", metadata={})
    with pytest.raises(ModelFileError, match="lacks metadata: class_names, input_size, mean, std"):
        Predictor(path)


def test_model_with_malformed_metadata(tmp_path):
    path = tiny_onnx(tmp_path / "odd.onnx", metadata={
        "class_names": "red, green, blue", "input_size": "[24, 40]", "mean": "[0, 0, 0]",
        "std": "[1, 1, 1]", "architecture": "tiny", "display_name": "Tiny"})
    with pytest.raises(ModelFileError, match="malformed metadata"):
        Predictor(path)

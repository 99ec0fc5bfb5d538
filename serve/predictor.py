"""Classify images with one exported ONNX file: ONNX Runtime, numpy and Pillow only.

Everything the model needs (class names and the preprocessing spec) is read from the file's
metadata, and preprocessing is built from that spec (``imaging.preprocessing``), the one the
validation transform is built from: any mode to RGB, resize to exactly H x W, scale to [0, 1],
normalise.

    from serve.predictor import Predictor
    model = Predictor("models/resnet34.onnx")
    print(model.predict_file("photo.jpg").top_class)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

import imaging
from common.cpu import usable_logical_cpus
from common.errors import UserError
from imaging.heatmap import normalized
from imaging.preprocessing import Preprocessing

REQUIRED_METADATA = ("class_names", "input_size", "mean", "std", "architecture", "display_name")


class ModelFileError(UserError):
    """An .onnx file that cannot be served, with a one-line reason."""


def create_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session tuned for latency: full graph optimisation (blocked NCHWc convolutions,
    fused integer kernels for INT8 files), one intra-op pool sized to the cores, no inter-op
    parallelism. Pool threads wait for the next operator by spinning, but only 50 us, and stop
    when a run ends: spinning saves 5-30% on an idle machine (the modified model's many small
    operators gain most), while long spins steal the cores of the next model of a request and
    of everything else; on a busy 2-core machine they doubled latency (benchmarks/README.md)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or usable_logical_cpus()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.spin_duration_us", "50")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Prediction:
    probabilities: dict[str, float]  # every class, in the model's class order
    top_class: str
    milliseconds: float
    heatmaps: np.ndarray | None = None  # classes x h x w Grad-CAM maps (files exported with them)
    # Top probability below the file's abstain_threshold; None: the file has no threshold
    unsure: bool | None = None

    def heatmap(self, class_name: str | None = None) -> np.ndarray | None:
        """One class's map (default: the top class's), scaled to [0, 1] by its maximum."""
        if self.heatmaps is None:
            return None
        index = list(self.probabilities).index(class_name or self.top_class)
        return normalized(self.heatmaps[index])


class Predictor:
    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file '{self.path}' does not exist")
        try:
            self.session = create_session(self.path, threads)
        except Exception as exc:
            raise ModelFileError(f"'{self.path}' is not a loadable ONNX model: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise ModelFileError(f"'{self.path}' lacks metadata: {', '.join(missing)} "
                                 "(export it with python -m export.run)")
        try:
            self.class_names: list[str] = json.loads(meta["class_names"])
            self.preprocessing = Preprocessing.from_metadata(meta)
            # Calibrated files: probabilities are softmax(logits / temperature), and below
            # abstain_threshold the model is unsure; files exported before have no threshold.
            self.temperature = float(meta.get("temperature", 1.0))
            self.abstain_threshold = float(meta["abstain_threshold"]) if "abstain_threshold" in meta else None
        except (ValueError, TypeError) as exc:
            raise ModelFileError(f"'{self.path}' has malformed metadata: {exc}") from None
        self.input_size = self.preprocessing.input_size  # (H, W)
        self.metadata = dict(meta)
        self.name = self.path.name.split(".")[0]
        self.display_name = meta["display_name"]
        self.precision = meta.get("precision", "fp32")
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.probability_output = "probabilities" if "probabilities" in outputs else outputs[0]
        # Files exported before heatmaps have none; everything else works the same.
        self.has_heatmaps = "heatmaps" in outputs

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """A Pillow image (any mode) as the model's 1 x 3 x H x W float32 input."""
        return self.preprocessing(image)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a preprocessed N x 3 x H x W batch."""
        return self.session.run([self.probability_output], {self.input_name: batch})[0]

    def run(self, output_names: list[str], batch: np.ndarray,
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """The named outputs for a preprocessed N x 3 x H x W float32 batch."""
        return self.session.run(output_names, {self.input_name: batch}, run_options)

    def is_unsure(self, probabilities: np.ndarray) -> bool | None:
        """Whether one image's probabilities fall below the file's threshold (None: no threshold)."""
        if self.abstain_threshold is None:
            return None
        return bool(float(np.max(probabilities)) < self.abstain_threshold)

    def predict(self, image: Image.Image, run_options: ort.RunOptions | None = None) -> Prediction:
        """Probabilities of every class and, where the file has them, every class's heatmap
        (``run_options.terminate = True`` from another thread stops a run in progress)."""
        started = time.perf_counter()
        wanted = [self.probability_output] + (["heatmaps"] if self.has_heatmaps else [])
        outputs = self.session.run(wanted, {self.input_name: self.preprocess(image)}, run_options)
        elapsed = (time.perf_counter() - started) * 1000
        probs = outputs[0][0]
        return Prediction(
            {name: float(p) for name, p in zip(self.class_names, probs)},
            self.class_names[int(np.argmax(probs))],
            elapsed,
            outputs[1][0] if self.has_heatmaps else None,
            self.is_unsure(probs),
        )

    def predict_file(self, source: imaging.Source, max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> Prediction:
        """Decode a file safely (see imaging.load_rgb) and classify it."""
        return self.predict(imaging.load_rgb(source, max_pixels))

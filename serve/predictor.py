"""Classify images with one exported ONNX file: ONNX Runtime, numpy and Pillow only.

Everything the model needs (class names and the preprocessing spec) is read from the file's
metadata, and preprocessing is built from that spec (``imaging.preprocessing``), the one the
validation transform is built from: any mode to RGB, resize to exactly H x W, scale to [0, 1],
normalise.

    from serve.predictor import Predictor
    model = Predictor("models/resnet34.onnx")
    print(model.predict_file("photo.jpg").top_class)

Two engines read the same files: ONNX Runtime (always installed) and OpenVINO (the optional
``openvino`` extra). Each runs a file at the precisions it supports on this CPU: an FP32 file
in ``fp32``, and with OpenVINO also in ``bf16`` where the CPU has native bfloat16 (AVX-512
BF16 or AMX); an INT8 file in ``int8``. ``Predictor.run`` is the same call whatever the engine.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

import imaging
from common.cpu import cpu_flags, usable_logical_cpus
from common.errors import UserError
from imaging.heatmap import normalized
from imaging.preprocessing import Preprocessing

REQUIRED_METADATA = ("class_names", "input_size", "mean", "std", "architecture", "display_name")
ENGINES = ("onnxruntime", "openvino")
REFERENCE_ENGINE = "onnxruntime"  # what a file's parity was proven on at export


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


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX): elsewhere bf16 is
    emulated and slower than float32, so it is not offered."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def available_engines() -> list[str]:
    return [e for e in ENGINES if e != "openvino" or openvino_available()]


def engine_precisions(engine: str, file_precision: str) -> tuple[str, ...]:
    """The precisions ``engine`` can run a file of ``file_precision`` in, on this CPU."""
    if file_precision == "int8":
        return ("int8",)
    if engine == "openvino" and native_bfloat16():
        return ("fp32", "bf16")
    return ("fp32",)


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None, precision: str):
        self.session = create_session(path, threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        # (name, ONNX Runtime type, shape with -1 for an open dimension) of each input and output
        self.signature = tuple([(a.name, a.type, [d if isinstance(d, int) else -1 for d in a.shape])
                                for a in args] for args in (self.session.get_inputs(), self.session.get_outputs()))

    def run(self, output_names: list[str], batch: np.ndarray,
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        return self.session.run(output_names, {self.input_name: batch}, run_options)


OPENVINO_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)",
                  "i64": "tensor(int64)", "i32": "tensor(int32)", "i8": "tensor(int8)",
                  "u8": "tensor(uint8)", "boolean": "tensor(bool)"}


class OpenVinoEngine:
    """OpenVINO's CPU plugin on the same ONNX file. Its inference precision is set explicitly:
    on a CPU with native bfloat16 OpenVINO's default is bf16, and ``fp32`` must mean float32.
    An INT8 file's QDQ nodes become integer kernels; the layers it kept float run in float32."""
    name = "openvino"

    def __init__(self, path: Path, threads: int | None, precision: str):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        self.metadata = {}
        if model.has_rt_info(["framework"]):  # the ONNX file's metadata_props
            for key in model.get_rt_info()["framework"]:
                self.metadata[key] = model.get_rt_info(["framework", key]).astype(str)
        self.input_name = model.inputs[0].get_any_name()
        self.output_names = [o.get_any_name() for o in model.outputs]
        # The ONNX file's own tensors, written as ONNX Runtime names their types.
        self.signature = tuple([(t.get_any_name(), OPENVINO_TYPES.get(t.get_element_type().get_type_name(), "?"),
                                 [d.get_length() if d.is_static else -1 for d in t.get_partial_shape()])
                                for t in tensors] for tensors in (model.inputs, model.outputs))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads or usable_logical_cpus(),
            "PERFORMANCE_HINT": "LATENCY",  # one stream: each request uses every core, as ORT
            "ENABLE_CPU_PINNING": False,  # as ORT: threads are not bound to cores others share
        })
        self.request = self.compiled.create_infer_request()
        # One infer request holds its outputs' memory: calls from several threads take turns
        # (each call already uses every core, so turns cost nothing but the wait).
        self.lock = threading.Lock()

    def run(self, output_names: list[str], batch: np.ndarray,
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """(ONNX Runtime's ``run_options`` cannot stop an OpenVINO run: past the deadline the
        request is answered and its slot freed, and this run ends on its own.)"""
        with self.lock:
            self.request.infer({0: np.ascontiguousarray(batch, np.float32)})
            # Copies: the request's output buffers are reused by the next call.
            return [np.array(self.request.get_tensor(name).data) for name in output_names]


ENGINE_CLASSES = {"onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine}


class Predictor:
    """One ONNX file on one engine at one precision (default: ONNX Runtime at the file's own,
    fp32 or int8). ``precision`` is what the model computes in (fp32, bf16 or int8);
    ``file_precision`` is the file's (fp32 or int8)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 engine: str = REFERENCE_ENGINE, precision: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file '{self.path}' does not exist")
        if engine not in ENGINES:
            raise UserError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
        if precision == "bf16" and "bf16" not in engine_precisions(engine, "fp32"):
            raise UserError(f"{engine} cannot compute in bf16 on this CPU (bf16 needs OpenVINO and "
                            "a CPU with AVX-512 BF16 or AMX)")
        if engine == "openvino" and not openvino_available():
            raise UserError("engine 'openvino' is not installed (pip install '.[openvino]')")
        try:
            self.backend = ENGINE_CLASSES[engine](self.path, threads, precision or "fp32")
        except Exception as exc:
            raise ModelFileError(f"'{self.path}' is not a loadable ONNX model: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        meta = self.backend.metadata
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
        self.file_precision = meta.get("precision", "fp32")
        self.precision = precision or self.file_precision
        supported = engine_precisions(engine, self.file_precision)
        if self.precision not in supported:
            raise UserError(f"{engine} cannot run the {self.file_precision} file '{self.path.name}' in "
                            f"{self.precision} on this CPU (it can: {', '.join(supported)})")
        self.engine = engine
        self.input_name = self.backend.input_name
        outputs = self.backend.output_names
        self.probability_output = "probabilities" if "probabilities" in outputs else outputs[0]
        # Files exported before heatmaps have none; everything else works the same.
        self.has_heatmaps = "heatmaps" in outputs
        self.choice: dict | None = None  # how the engine and precision were chosen (serve.catalog)

    @property
    def session(self):
        """The ONNX Runtime session (ONNX Runtime engine only)."""
        return self.backend.session

    @property
    def signature(self) -> tuple[list, list]:
        """(inputs, outputs) of the ONNX file, each (name, ONNX Runtime type, shape with -1 for
        an open dimension), whichever engine runs it."""
        return self.backend.signature

    @property
    def output_names(self) -> list[str]:
        return list(self.backend.output_names)

    def run(self, output_names: list[str] | None, batch: np.ndarray,
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """The named outputs (None: all) for a preprocessed N x 3 x H x W float32 batch, on
        whichever engine: the one call every caller uses (``run_options.terminate = True``
        from another thread stops an ONNX Runtime run in progress)."""
        return self.backend.run(list(output_names or self.backend.output_names), batch, run_options)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """A Pillow image (any mode) as the model's 1 x 3 x H x W float32 input."""
        return self.preprocessing(image)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a preprocessed N x 3 x H x W batch."""
        return self.run([self.probability_output], batch)[0]

    def is_unsure(self, probabilities: np.ndarray) -> bool | None:
        """Whether one image's probabilities fall below the file's threshold (None: no threshold)."""
        if self.abstain_threshold is None:
            return None
        return bool(float(np.max(probabilities)) < self.abstain_threshold)

    def predict(self, image: Image.Image, run_options: ort.RunOptions | None = None) -> Prediction:
        """Probabilities of every class and, where the file has them, every class's heatmap."""
        started = time.perf_counter()
        wanted = [self.probability_output] + (["heatmaps"] if self.has_heatmaps else [])
        outputs = self.run(wanted, self.preprocess(image), run_options)
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

"""FP32 ONNX file -> INT8 ONNX file: static quantization calibrated on real images.

The recipe (each choice measured with benchmarks/inference.py; see benchmarks/README.md):
- QDQ format, weights int8 per output channel, activations uint8 calibrated with MinMax on
  training images through the real preprocessing; ONNX Runtime fuses each
  DequantizeLinear -> Conv -> QuantizeLinear into one integer convolution (VNNI/AMX on x86).
  Entropy and Percentile calibration agreed with FP32 no better than MinMax.
- Weights use 7 of their 8 bits (reduce_range): x86 CPUs without VNNI add pairs of
  uint8 x int8 products in 16 bits, which full 8-bit weights can overflow. The files may be
  served anywhere, and 7-bit weights agreed with FP32 as well as 8-bit ones.
- Quantized: convolutions, max-pooling, the residual additions, the SE blocks' means and
  channel scaling. Kept float32: the SE gate (a few hundred numbers per block), the final
  pooling, the classifier head, the softmax and the Grad-CAM heatmaps (logits,
  probabilities and heatmaps keep full precision), and the modified model's stem (a 3-channel convolution, faster in float,
  feeding the pooled Mish).
- Mish between integer layers: as float32 operators (Exp, Div, ...) it cost more than the
  convolutions around it. Its input and output are 8-bit anyway, so it becomes
  x * (w1 sigmoid(a1 x + b1) + w2 sigmoid(a2 x + b2)), which ONNX Runtime runs as integer
  kernels (two 256-entry lookup tables, an add and a multiply); see ``mish_lookup_tables``.
  Where the calibrated ranges do not allow it, Mish stays float.

Where a model misses the fidelity targets fully INT8, a few convolutions stay float32 too, the
fewest that a sensitivity ranking and a greedy search find (export/sensitivity.py):
``Quantizer`` calibrates once and re-quantizes with other layers float in a second or two.

``python -m export.run --quantize int8`` uses ``Quantizer`` for each exported model;
``quantize_file`` is the one-shot form (benchmarks/inference.py).
"""
from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from common.errors import Failure
from common.files import temporary_path
from export.onnx_export import INPUT_NAME, OUTPUT_NAMES, set_metadata

CALIBRATION_IMAGES = 256  # the most training images calibration reads
CALIBRATION_BATCH = 16
# A Relu is folded into its integer convolution; GlobalAveragePool: the SE blocks' means (see
# _means_as_global_pools).
QUANTIZED_OPS = ["Conv", "Relu", "MaxPool", "Add", "Mul", "GlobalAveragePool"]
# training.layers.ExpMish as the exporter writes it: x * n / (n + 2), n = e (e + 2), e = exp(min(x, 20)).
MISH_OPS = Counter({"Clip": 1, "Exp": 1, "Add": 2, "Mul": 2, "Div": 1})
# mish(x) = x * tanh(softplus(x)) ~ x * (sum of w * sigmoid(a x + b) over (w, a, b) terms):
# minimax fits on [-10, 10], the first one used that a layer's calibrated range allows (see
# mish_lookup_tables). Two terms are off by at most 0.007, a fifth of a step of an 8-bit
# activation whose range spans 8; one is off by 0.032, and that systematic error changed 3% of
# a trained model's answers.
MISH_GATE_FITS = (
    ((0.2943, 1.1244, 1.6482), (0.7057, 1.6711, 0.0051)),
    ((1.0, 1.26, 0.57),),
)


class QuantizeError(Failure):
    """A quantization that cannot be completed, with a one-line reason."""


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        self.batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}


class _Graph:
    """A graph's nodes, indexed by the value each makes and the nodes that read each value:
    the float layers are found from the graph's own structure, not from the exporter's private
    node metadata or Python class names, which a torch upgrade may change."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.users = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.users[name].append(node)
        self.constants = {i.name for i in model.graph.initializer} | {
            o for n in self.nodes if n.op_type == "Constant" for o in n.output}

    def mish(self, exp: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The nodes of the Mish (``MISH_OPS``) around one Exp, or [] where they are no Mish:
        the Clip feeding it, then each Add, Mul or Div that reads only the Mish's own values,
        its input and constants."""
        clip = self.producer.get(exp.input[0])
        if clip is None or clip.op_type != "Clip":
            return []
        x, nodes = self.source(clip.input[0]), [clip, exp]
        made = {clip.output[0], exp.output[0]}
        grown = True
        while grown:
            grown = False
            for node in [u for value in list(made) for u in self.users[value]]:
                if node not in nodes and node.op_type in ("Add", "Mul", "Div") and all(
                        i in made or i in self.constants or self.source(i) == x for i in node.input):
                    nodes.append(node)
                    made.update(node.output)
                    grown = True
        return nodes if Counter(n.op_type for n in nodes) == MISH_OPS else []

    def source(self, value: str):
        """What a value is: a DequantizeLinear's output is its (quantized input, scale, zero
        point), whichever copy of that DequantizeLinear made it."""
        node = self.producer.get(value)
        return tuple(node.input) if node is not None and node.op_type == "DequantizeLinear" else value

    def mish_instances(self) -> list[list[onnx.NodeProto]]:
        """Every Mish of the graph; any other Exp is an error (quantization would not know it)."""
        instances = []
        for exp in (n for n in self.nodes if n.op_type == "Exp"):
            nodes = self.mish(exp)
            if not nodes:
                raise QuantizeError(f"an Exp ({exp.name}) that is not the exported Mish "
                                    "(x * n / (n + 2), n = e (e + 2), e = exp(min(x, 20)))")
            instances.append(nodes)
        return instances

    def output_of(self, nodes: list[onnx.NodeProto]) -> str:
        """The value a group of nodes makes that is read outside it (a graph output counts)."""
        names = {n.name for n in nodes}
        return next(o for n in nodes for o in n.output
                    if any(u.name not in names for u in self.users[o]) or not self.users[o])

    def pooled_mish(self, instances: list[list[onnx.NodeProto]]) -> set[str]:
        """training.layers.PooledMish: Max(mish(MaxPool(s)), mish(-MaxPool(-s))), each Mish's
        input reached through MaxPool and Neg nodes only. Its nodes."""
        by_output = {self.output_of(nodes): nodes for nodes in instances}
        found = set()
        for node in (n for n in self.nodes if n.op_type == "Max"):
            if len(node.input) == 2 and all(i in by_output for i in node.input):
                found.add(node.name)
                for value in node.input:
                    mish = by_output[value]
                    found.update(n.name for n in mish)
                    before = self.producer.get(mish[0].input[0])
                    while before is not None and before.op_type in ("MaxPool", "Neg"):
                        found.add(before.name)
                        before = self.producer.get(before.input[0])
        return found

    def ancestors(self, values: list[str]) -> set[str]:
        """Names of the nodes that ``values`` are computed from."""
        found, todo = set(), list(values)
        while todo:
            node = self.producer.get(todo.pop())
            if node is not None and node.name not in found:
                found.add(node.name)
                todo += list(node.input)
        return found

    def gates_its_input(self, node: onnx.NodeProto, depth: int = 8) -> bool:
        """Whether ``node``'s input is multiplied by a value computed from its output within
        ``depth`` steps: squeeze-and-excitation's mean, gate and scaling."""
        x, values = node.input[0], [node.output[0]]
        for _ in range(depth):
            readers = [u for v in values for u in self.users[v]]
            if any(u.op_type == "Mul" and x in u.input for u in readers):
                return True
            values = [o for u in readers if u.op_type != "Conv" for o in u.output]
        return False


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes quantize_static must leave float32 (see the module docstring): each
    Mish (``mish_lookup_tables`` makes integer kernels of those it can), the pooled Mish, the
    nodes only the heatmaps are computed from (Grad-CAM), and a stem convolution that feeds
    only float nodes."""
    graph = _Graph(model)
    instances = graph.mish_instances()
    keep = {n.name for nodes in instances for n in nodes} | graph.pooled_mish(instances)
    heatmaps, answers = OUTPUT_NAMES[2], list(OUTPUT_NAMES[:2])
    keep |= graph.ancestors([heatmaps]) - graph.ancestors(answers)
    # The stem convolution reads the 3-channel image, where the integer kernel is slower than the
    # float one (measured): keep it float when everything it feeds stays float anyway.
    inputs = {i.name for i in model.graph.input}
    for conv in (n for n in graph.nodes if n.op_type == "Conv" and n.input[0] in inputs):
        users = graph.users[conv.output[0]]
        if users and all(n.name in keep for n in users):
            keep.add(conv.name)
    return [n.name for n in graph.nodes if n.name in keep]


def _means_as_global_pools(model: onnx.ModelProto) -> None:
    """The SE blocks' ReduceMean over H and W -> GlobalAveragePool + Flatten, the same numbers.
    ONNX Runtime has an integer GlobalAveragePool that reads the convolution's 8-bit output as
    it is, where a float ReduceMean needs all of it dequantized first. (The final pooling, which
    feeds the float head, stays a ReduceMean.)"""
    graph = _Graph(model)
    initializers = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in graph.nodes:
        axes = node.input[1] if node.op_type == "ReduceMean" and len(node.input) == 2 else ""
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if axes in initializers and list(numpy_helper.to_array(initializers[axes])) == [2, 3] \
                and keepdims == 0 and graph.gates_its_input(node):
            pooled = helper.make_node("GlobalAveragePool", [node.input[0]], [node.output[0] + "_pooled"],
                                      name=node.name + "_pool")
            flat = helper.make_node("Flatten", [pooled.output[0]], [node.output[0]], name=node.name, axis=1)
            for new in (pooled, flat):  # the exporter's metadata stays with the values it describes
                new.metadata_props.extend(node.metadata_props)
            nodes += [pooled, flat]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def mish_lookup_tables(model: onnx.ModelProto) -> int:
    """Replace each float Mish between a DequantizeLinear and a QuantizeLinear by
    x * sum(w sigmoid(a x + b)) (a fit of MISH_GATE_FITS) in QDQ form, which ONNX Runtime fuses
    into integer kernels: a QLinearSigmoid (a 256-entry lookup table) per term, a QLinearAdd
    for two terms, and a QLinearMul. Returns how many were replaced.

    ``a x + b`` costs nothing: it is the DequantizeLinear feeding the sigmoid, with scale a s and
    zero point z - b / (a s) (s, z: the input's). That zero point must be a uint8: the first fit
    whose zero points all are is used; where none fits (a tiny calibrated range), that Mish
    stays float. Each sigmoid is quantized to [0, 1] and read back scaled by its weight; the
    gate, their sum, is in [0, 1] again.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    indexed = _Graph(model)
    producer, users = indexed.producer, indexed.users

    removed, replacements = set(), {}  # the last node of a Mish -> the nodes replacing all of it
    for nodes in indexed.mish_instances():
        names = {n.name for n in nodes}
        made = {o for n in nodes for o in n.output}
        inputs = {i for n in nodes for i in n.input if i and i not in made and i not in initializers}
        outputs = [o for o in made if any(u.name not in names for u in users[o])]
        sources = [producer.get(i) for i in inputs]
        if len(outputs) != 1 or [u.op_type for u in users[outputs[0]]] != ["QuantizeLinear"] \
                or not sources or any(s is None or s.op_type != "DequantizeLinear" for s in sources) \
                or len({s.input[0] for s in sources}) != 1:
            continue
        quantized, scale_name, zero_name = sources[0].input
        scale = float(numpy_helper.to_array(initializers[scale_name]))
        zero = int(numpy_helper.to_array(initializers[zero_name]))
        for fit in MISH_GATE_FITS:
            shifted_zeros = [round(zero - b / (a * scale)) for _, a, b in fit]
            if all(0 <= z <= 255 for z in shifted_zeros):
                break
        else:
            continue
        y, p = outputs[0], f"{outputs[0]}_mish_lut_"
        constants = {"unit_scale": np.float32(1 / 255), "unit_zero": np.uint8(0)}
        make = helper.make_node
        added, terms = [], []
        for i, ((w, a, _), shifted_zero) in enumerate(zip(fit, shifted_zeros)):
            constants.update({f"scale{i}": np.float32(a * scale), f"zero{i}": np.uint8(shifted_zero),
                              f"weight{i}": np.float32(w / 255)})
            t = f"{p}term{i}"
            added += [
                make("DequantizeLinear", [quantized, p + f"scale{i}", p + f"zero{i}"], [t + "_ax_b"], name=t + "_dq"),
                make("Sigmoid", [t + "_ax_b"], [t + "_sigmoid"], name=t + "_sigmoid"),
                make("QuantizeLinear", [t + "_sigmoid", p + "unit_scale", p + "unit_zero"], [t + "_q"], name=t + "_q"),
                make("DequantizeLinear", [t + "_q", p + f"weight{i}", p + "unit_zero"], [t], name=t + "_weighted"),
            ]
            terms.append(t)
        gate = terms[0]
        if len(terms) == 2:
            gate = p + "gate_dq"
            added += [
                make("Add", terms, [p + "gate"], name=p + "gate"),
                make("QuantizeLinear", [p + "gate", p + "unit_scale", p + "unit_zero"], [p + "gate_q"], name=p + "gate_q"),
                make("DequantizeLinear", [p + "gate_q", p + "unit_scale", p + "unit_zero"], [gate], name=gate),
            ]
        added += [
            make("DequantizeLinear", [quantized, scale_name, zero_name], [p + "x"], name=p + "dq_x"),
            make("Mul", [p + "x", gate], [y], name=p + "mul"),
        ]
        graph.initializer.extend(numpy_helper.from_array(np.array(v), p + k) for k, v in constants.items())
        replacements[producer[y].name] = added
        removed |= names
    # The replacement takes the place of the Mish's last node: its inputs come earlier, its
    # output's users later, so the node list stays topologically sorted.
    nodes = []
    for node in graph.node:
        if node.name not in removed:
            nodes.append(node)
        nodes += replacements.get(node.name, [])
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replacements)


def quantizable_layers(model: onnx.ModelProto, keep_float: list[str]) -> dict[str, list[str]]:
    """The layers a search may keep float: each integer convolution, named by its module
    ("layer3.5.conv2"), with the Relu it alone feeds (folded into it when both are INT8)."""
    users = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            users[name].append(node)
    layers = {}
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and n.name not in keep_float):
        name = conv.input[1].removeprefix("model.").removesuffix(".weight")
        after = users[conv.output[0]]
        relu = [after[0].name] if len(after) == 1 and after[0].op_type == "Relu" else []
        layers[name] = [conv.name] + relu
    return layers


class Quantizer:
    """One FP32 file prepared for quantize_static and calibrated once, then quantized as often
    as a search needs, each time with other layers kept float: the calibrated ranges are
    cached (quantize_static's calibration cache), so each file costs a second or two.
    Use it as a context manager (its work folder) inside ``one_line_errors``."""

    def __init__(self, fp32_path: Path, calibration: np.ndarray, *,
                 method: CalibrationMethod = CalibrationMethod.MinMax, reduce_range: bool = True):
        if len(calibration) == 0:
            raise QuantizeError(f"{fp32_path.name}: no calibration images")
        self.fp32_path, self.method, self.reduce_range = fp32_path, method, reduce_range
        self.calibration = calibration[:CALIBRATION_IMAGES]
        self._work = tempfile.TemporaryDirectory(prefix="quantize-")
        work = Path(self._work.name)
        self.prepared, self.cache = work / "prepared.onnx", work / "calibration.json"
        # Shape inference only: the FP32 graph is optimised already (BatchNorm folded), and
        # skipping ONNX Runtime's rewrite keeps the graph's form, which float_nodes reads.
        quant_pre_process(str(fp32_path), str(self.prepared), skip_optimization=True,
                          skip_symbolic_shape=True)
        graph = onnx.load(str(self.prepared))
        _means_as_global_pools(graph)
        onnx.save(graph, str(self.prepared))
        self.always_float = float_nodes(graph)
        self.layers = quantizable_layers(graph, self.always_float)

    def __enter__(self) -> "Quantizer":
        return self

    def __exit__(self, *exc) -> None:
        self._work.cleanup()

    def quantize(self, out: Path, metadata: dict[str, str], float_layers: tuple[str, ...] | list[str] = (),
                 check: bool = True) -> Path:
        """Write the INT8 file to ``out``, keeping ``float_layers`` (names of ``layers``) float32.
        ``check``: run ONNX's full checker (a search's trial files, never shipped, skip it)."""
        unknown = [layer for layer in float_layers if layer not in self.layers]
        if unknown:
            raise QuantizeError(f"{self.fp32_path.name}: no quantizable layer {', '.join(unknown)}")
        exclude = self.always_float + [n for layer in float_layers for n in self.layers[layer]]
        quantize_static(
            str(self.prepared), str(out), _Batches(self.calibration),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=self.reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=exclude,
            calibrate_method=self.method, calibration_providers=["CPUExecutionProvider"],
            calibration_cache_path=str(self.cache),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        proto = onnx.load(str(out))
        mish_lookup_tables(proto)
        set_metadata(proto, metadata)
        onnx.save(proto, str(out))
        if check:
            onnx.checker.check_model(str(out), full_check=True)
        return out


@contextmanager
def one_line_errors(fp32_path: Path, *partial: Path):
    """Any failure inside -> a QuantizeError with a one-line reason; ``partial`` files removed."""
    try:
        yield
    except Exception as exc:
        for path in partial:
            path.unlink(missing_ok=True)
        if isinstance(exc, QuantizeError):
            raise
        raise QuantizeError(f"{fp32_path.name}: quantization failed: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def quantize_file(fp32_path: Path, out_path: Path, calibration: np.ndarray, metadata: dict[str, str],
                  *, method: CalibrationMethod = CalibrationMethod.MinMax,
                  reduce_range: bool = True, float_layers: tuple[str, ...] | list[str] = ()) -> Path:
    """Quantize ``fp32_path`` into a temporary file next to ``out_path``; returns its path.

    ``calibration``: preprocessed images (N x 3 x H x W float32), N >= 1. ``metadata``
    replaces the file's metadata (normally the FP32 file's, with precision "int8").
    ``float_layers``: layers (``quantizable_layers`` names) kept float32, as a search chose.
    The caller renames the file into place once it has checked it, as for FP32 exports.
    """
    tmp = temporary_path(out_path)
    with one_line_errors(fp32_path, tmp):
        with Quantizer(fp32_path, calibration, method=method, reduce_range=reduce_range) as quantizer:
            return quantizer.quantize(tmp, metadata, float_layers)

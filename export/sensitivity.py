"""Which layers cost INT8 its agreement with FP32, and the fewest to keep float32 to meet the targets.

Sensitivity: each quantizable layer (a convolution, see ``quantize.quantizable_layers``) is
kept float alone, every other layer INT8, and the file is measured against FP32 on up to
SENSITIVITY_IMAGES validation images. Keeping one layer float, rather than quantizing one layer
alone, measures exactly what the search can buy with that layer, with the noise of all the
others around it, as the INT8 file has it. Layers are ranked by the top-1 agreement they give
(the target), ties broken by the KL divergence from FP32's probabilities (agreement on a few
hundred images moves in steps, and most layers share a step).

Search: while the file misses the targets, the next layer of the ranking is kept float, and
stays float when that brings the targets closer (or, at the same distance, lowers the KL
divergence: a step that agreement on a few hundred images may not show yet). At most MAX_TRIALS
layers are tried and MAX_FLOAT_LAYERS kept. Once the targets are met, each kept layer the
targets hold without is made INT8 again. Where they are not met, the best file found is kept
and the export warns. Each try re-quantizes from the cached calibration and measures on all
the validation images the INT8 report uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export.onnx_export import INPUT_NAME
from export.quantize import CALIBRATION_BATCH, Quantizer

SENSITIVITY_IMAGES = 200  # the most validation images each layer's sensitivity is measured on
MAX_FLOAT_LAYERS = 8
MAX_TRIALS = 8  # each try costs a quantization (a few seconds) and a measurement
TARGETS = {"min_top1_agreement": 0.99, "max_accuracy_change": 0.01}  # |FP32 - INT8| accuracy


def probabilities(session, images: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> np.ndarray:
    return np.concatenate([session.run(["probabilities"], {INPUT_NAME: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def fidelity(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict:
    """INT8 probabilities against FP32's: top-1 agreement, accuracy change (INT8 - FP32),
    mean KL(FP32 || INT8) and mean absolute probability difference."""
    eps = 1e-12
    fp32_top, int8_top = fp32.argmax(1), int8.argmax(1)
    return {
        "top1_agreement": float((fp32_top == int8_top).mean()),
        "accuracy_change": float((int8_top == labels).mean() - (fp32_top == labels).mean()),
        "kl_divergence": float(np.mean(np.sum(fp32 * (np.log(fp32 + eps) - np.log(int8 + eps)), 1))),
        "mean_abs_probability_diff": float(np.abs(fp32 - int8).mean()),
    }


ROUNDING = 1e-9  # shares of image counts in floating point: 0.86 - 0.85 is 0.0100000000000000009


def shortfall(measured: dict, targets: dict = TARGETS) -> float:
    """How far a file is from the targets: 0 when it meets both (exactly on a target counts)."""
    missing = max(0.0, targets["min_top1_agreement"] - measured["top1_agreement"]) + \
        max(0.0, abs(measured["accuracy_change"]) - targets["max_accuracy_change"])
    return 0.0 if missing <= ROUNDING else missing


def meets(measured: dict, targets: dict = TARGETS) -> bool:
    return shortfall(measured, targets) == 0


class Measure:
    """Quantize with some layers float and measure the file against FP32 on labelled images."""

    def __init__(self, quantizer: Quantizer, metadata: dict, work: Path, fp32_session,
                 images: np.ndarray, labels: np.ndarray, open_session: Callable):
        self.quantizer, self.metadata, self.work, self.open_session = quantizer, metadata, work, open_session
        self.images, self.labels = images, labels
        self.fp32 = probabilities(fp32_session, images)
        self.files = 0  # how many INT8 files it made (the search's cost)

    def __call__(self, float_layers: list[str] | tuple[str, ...], images: int | None = None) -> dict:
        path = self.quantizer.quantize(self.work / "trial.int8.onnx", self.metadata, float_layers, check=False)
        self.files += 1
        n = len(self.images) if images is None else images
        int8 = probabilities(self.open_session(path), self.images[:n])
        return fidelity(self.fp32[:n], int8, self.labels[:n])


def rank_layers(measure: Measure, images: int = SENSITIVITY_IMAGES, layers: list[str] | None = None) -> dict:
    """Each quantizable layer (or each of ``layers``) kept float alone, ranked: most agreement
    recovered first."""
    n = min(images, len(measure.images))
    rows = [{"layer": layer, **measure([layer], n)} for layer in layers or measure.quantizer.layers]
    rows.sort(key=lambda r: (-r["top1_agreement"], r["kl_divergence"]))
    return {"method": "each layer kept float alone, every other layer INT8, measured against FP32",
            "ranked_by": "top-1 agreement (highest first), then KL divergence (lowest first)",
            "images": n, "all_int8": measure([], n),
            "layers": [{"rank": i + 1, **r} for i, r in enumerate(rows)]}


@dataclass
class SearchResult:
    float_layers: list[str]
    all_int8: dict  # measured with every layer INT8
    final: dict  # measured with float_layers float
    met: bool
    steps: list[dict] = field(default_factory=list)  # every file tried, in order


def _better(new: dict, old: dict, targets: dict) -> bool:
    a, b = shortfall(new, targets), shortfall(old, targets)
    return a < b or (a == b and new["kl_divergence"] < old["kl_divergence"])


def search(measure: Measure, ranking: list[str], targets: dict = TARGETS, all_int8: dict | None = None,
           max_float: int = MAX_FLOAT_LAYERS, max_trials: int = MAX_TRIALS) -> SearchResult:
    """The fewest layers of ``ranking`` (most sensitive first) to keep float to meet ``targets``."""
    start = all_int8 if all_int8 is not None else measure([])
    best, kept, steps = start, [], []
    for layer in ranking[:max_trials]:
        if meets(best, targets) or len(kept) == max_float:
            break
        tried = measure(kept + [layer])
        keep = _better(tried, best, targets)
        steps.append({"float_layers": kept + [layer], **tried, "kept": keep})
        if keep:
            best, kept = tried, kept + [layer]
    if meets(best, targets):  # drop what the targets hold without, latest first
        for layer in reversed(kept[:-1]):
            fewer = [k for k in kept if k != layer]
            tried = measure(fewer)
            steps.append({"float_layers": fewer, **tried, "kept": meets(tried, targets)})
            if meets(tried, targets):
                best, kept = tried, fewer
    return SearchResult(kept, start, best, meets(best, targets), steps)


def choose_float_layers(measure: Measure, targets: dict = TARGETS,
                        always_rank: bool = False) -> tuple[SearchResult, dict]:
    """The search's answer and the sensitivity report. A file that meets the targets with every
    layer INT8 needs neither: its layers are ranked only with ``always_rank``."""
    all_int8 = measure([])
    ranked = {"layers": [], "all_int8": all_int8, "images": len(measure.images),
              "skipped": "every layer INT8 meets the targets"}
    if meets(all_int8, targets) and not always_rank:
        return SearchResult([], all_int8, all_int8, True), ranked
    ranked = rank_layers(measure)
    if meets(all_int8, targets):
        return SearchResult([], all_int8, all_int8, True), ranked
    return search(measure, [r["layer"] for r in ranked["layers"]], targets, all_int8), ranked


def summary(name: str, result: SearchResult, ranked: dict, targets: dict = TARGETS) -> str:
    """The export's line: which layers stayed float and why."""
    def state(m):
        return f"agreement {m['top1_agreement']:.1%}, accuracy change {100 * m['accuracy_change']:+.1f} points"

    if not result.float_layers and result.met:
        return f"{name}: every layer INT8 ({state(result.all_int8)})"
    rank = {r["layer"]: r["rank"] for r in ranked["layers"]}
    kept = ", ".join(f"{layer} (#{rank[layer]})" for layer in result.float_layers) or "none"
    line = (f"{name}: kept float {kept} of {len(ranked['layers'])} layers ranked by sensitivity "
            f"(#: rank), because every layer INT8 missed the targets: {state(result.all_int8)} -> "
            f"{state(result.final)}")
    if not result.met:
        line += (f"; warning: targets (agreement >= {targets['min_top1_agreement']:.0%}, |accuracy change| "
                 f"<= {100 * targets['max_accuracy_change']:.0f} point) not met after {len(result.steps)} "
                 "tries, keeping the best found")
    return line

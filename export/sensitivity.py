"""Which layers cost INT8 its fidelity to FP32, and the fewest to keep float32 to meet the targets.

Sensitivity: each quantizable layer (a convolution, see ``quantize.quantizable_layers``) is
kept float alone, every other layer INT8, and the file is measured against FP32 on up to
SENSITIVITY_IMAGES validation images. Keeping one layer float, rather than quantizing one layer
alone, measures exactly what the search can buy with that layer, with the noise of all the
others around it, as the INT8 file has it. Layers are ranked by how close they bring the file
to the targets (export/fidelity.py), ties broken by the KL divergence from FP32's
probabilities (agreement on a few hundred images moves in steps, and most layers share a step).

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

from export.fidelity import TARGETS, Targets, fidelity, run_outputs
from export.fidelity import describe as describe_fidelity
from export.quantize import Quantizer

SENSITIVITY_IMAGES = 200  # the most validation images each layer's sensitivity is measured on
MAX_FLOAT_LAYERS = 8
MAX_TRIALS = 8  # each try costs a quantization (a few seconds) and a measurement


class Measure:
    """Quantize with some layers float and measure the file against FP32 on labelled images."""

    def __init__(self, quantizer: Quantizer, metadata: dict, work: Path, fp32_session,
                 images: np.ndarray, labels: np.ndarray, open_session: Callable, targets: Targets = TARGETS):
        self.quantizer, self.metadata, self.work, self.open_session = quantizer, metadata, work, open_session
        self.targets = targets  # its decisive margin
        self.images, self.labels = images, labels
        self.fp32 = run_outputs(fp32_session, images)[0]
        self.files = 0  # how many INT8 files it made (the search's cost)

    def __call__(self, float_layers: list[str] | tuple[str, ...], images: int | None = None) -> dict:
        path = self.quantizer.quantize(self.work / "trial.int8.onnx", self.metadata, float_layers, check=False)
        self.files += 1
        n = len(self.images) if images is None else images
        int8 = run_outputs(self.open_session(path), self.images[:n])[0]
        return fidelity(self.fp32[:n], int8, self.labels[:n], self.targets)


def rank_layers(measure: Measure, images: int = SENSITIVITY_IMAGES, layers: list[str] | None = None,
                targets: Targets = TARGETS) -> dict:
    """Each quantizable layer (or each of ``layers``) kept float alone, ranked: closest to the
    targets first."""
    n = min(images, len(measure.images))
    rows = [{"layer": layer, **measure([layer], n)} for layer in layers or measure.quantizer.layers]
    rows.sort(key=lambda r: (targets.shortfall(r), r["kl_divergence"]))
    return {"method": "each layer kept float alone, every other layer INT8, measured against FP32",
            "ranked_by": "distance from the targets (closest first), then KL divergence (lowest first)",
            "images": n, "all_int8": measure([], n),
            "layers": [{"rank": i + 1, **r} for i, r in enumerate(rows)]}


@dataclass
class SearchResult:
    float_layers: list[str]
    all_int8: dict  # measured with every layer INT8
    final: dict  # measured with float_layers float
    met: bool
    steps: list[dict] = field(default_factory=list)  # every file tried, in order


def _better(new: dict, old: dict, targets: Targets) -> bool:
    a, b = targets.shortfall(new), targets.shortfall(old)
    return a < b or (a == b and new["kl_divergence"] < old["kl_divergence"])


def search(measure: Measure, ranking: list[str], targets: Targets = TARGETS, all_int8: dict | None = None,
           max_float: int = MAX_FLOAT_LAYERS, max_trials: int = MAX_TRIALS) -> SearchResult:
    """The fewest layers of ``ranking`` (most sensitive first) to keep float to meet ``targets``."""
    start = all_int8 if all_int8 is not None else measure([])
    best, kept, steps = start, [], []
    for layer in ranking[:max_trials]:
        if targets.met(best) or len(kept) == max_float:
            break
        tried = measure(kept + [layer])
        keep = _better(tried, best, targets)
        steps.append({"float_layers": kept + [layer], **tried, "kept": keep})
        if keep:
            best, kept = tried, kept + [layer]
    if targets.met(best):  # drop what the targets hold without, latest first
        for layer in reversed(kept[:-1]):
            fewer = [k for k in kept if k != layer]
            tried = measure(fewer)
            steps.append({"float_layers": fewer, **tried, "kept": targets.met(tried)})
            if targets.met(tried):
                best, kept = tried, fewer
    return SearchResult(kept, start, best, targets.met(best), steps)


def choose_float_layers(measure: Measure, targets: Targets = TARGETS,
                        always_rank: bool = False) -> tuple[SearchResult, dict]:
    """The search's answer and the sensitivity report. A file that meets the targets with every
    layer INT8 needs neither: its layers are ranked only with ``always_rank``."""
    all_int8 = measure([])
    ranked = {"layers": [], "all_int8": all_int8, "images": len(measure.images),
              "skipped": "every layer INT8 meets the targets"}
    if targets.met(all_int8) and not always_rank:
        return SearchResult([], all_int8, all_int8, True), ranked
    ranked = rank_layers(measure, targets=targets)
    if targets.met(all_int8):
        return SearchResult([], all_int8, all_int8, True), ranked
    return search(measure, [r["layer"] for r in ranked["layers"]], targets, all_int8), ranked


def summary(name: str, result: SearchResult, ranked: dict, targets: Targets = TARGETS) -> str:
    """The export's line: which layers stayed float and why."""
    state = describe_fidelity
    if not result.float_layers and result.met:
        return f"{name}: every layer INT8 ({state(result.all_int8)})"
    rank = {r["layer"]: r["rank"] for r in ranked["layers"]}
    kept = ", ".join(f"{layer} (#{rank[layer]})" for layer in result.float_layers) or "none"
    line = (f"{name}: kept float {kept} of {len(ranked['layers'])} layers ranked by sensitivity "
            f"(#: rank), because every layer INT8 missed the targets: {state(result.all_int8)} -> "
            f"{state(result.final)}")
    if not result.met:
        line += (f"; warning: targets ({targets.describe()}) not met after {len(result.steps)} "
                 "tries, keeping the best found")
    return line

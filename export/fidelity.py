"""How close an INT8 file's answers are to its FP32 file's: one measure, one sign convention
(a change is INT8 - FP32), one set of targets, used by the export's report and the layer search.

Raw top-1 agreement counts every flip alike, and a model that is unsure between two classes
flips on the smallest error: on real photos every INT8 flip was such a near-tie. So the target
is agreement on the *decisive* images, where FP32's two most likely classes are at least
``decisive_margin`` apart, together with the accuracy change and the largest probability
change; raw agreement is reported beside them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from export.onnx_export import INPUT_NAME

BATCH = 16  # images per session call
ROUNDING = 1e-9  # shares of image counts in floating point: 0.86 - 0.85 is 0.0100000000000000009
HEATMAP_CORRELATION_TARGET = 0.9


@dataclass(frozen=True)
class Targets:
    """What an INT8 file must hold against its FP32 file (shares, not percent)."""

    min_decisive_agreement: float = 0.995  # top-1 agreement on the decisive images
    max_abs_accuracy_change: float = 0.01  # |INT8 - FP32| accuracy: 1 point
    max_probability_change: float = 0.1  # the largest |INT8 - FP32| of any probability
    decisive_margin: float = 0.05  # an image is decisive where FP32's top-2 margin is at least this

    def shortfall(self, measured: dict) -> float:
        """How far a measurement is from the targets: 0 when it meets them (exactly on a target
        counts; no decisive image leaves nothing to disagree on)."""
        decisive = measured["decisive_agreement"]
        missing = max(0.0, self.min_decisive_agreement - (1.0 if decisive is None else decisive)) + \
            max(0.0, abs(measured["accuracy_change"]) - self.max_abs_accuracy_change) + \
            max(0.0, measured["max_probability_change"] - self.max_probability_change)
        return 0.0 if missing <= ROUNDING else missing

    def met(self, measured: dict) -> bool:
        return measured["images"] > 0 and self.shortfall(measured) == 0

    def describe(self) -> str:
        return (f"agreement on decisive images (FP32 top-2 margin >= {self.decisive_margin:g}) >= "
                f"{self.min_decisive_agreement:.1%}, |accuracy change| <= "
                f"{100 * self.max_abs_accuracy_change:g} point, largest probability change <= "
                f"{self.max_probability_change:g}")

    def as_dict(self) -> dict:
        return asdict(self)


TARGETS = Targets()


def fidelity(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, targets: Targets = TARGETS) -> dict:
    """INT8 probabilities (N x classes) against FP32's on labelled images."""
    n = len(fp32)
    if n == 0:
        return {"images": 0, "top1_agreement": None, "decisive_images": 0, "decisive_agreement": None,
                "fp32_accuracy": None, "int8_accuracy": None, "accuracy_change": None,
                "max_probability_change": None, "kl_divergence": None}
    fp32_top, int8_top = fp32.argmax(1), int8.argmax(1)
    agree = fp32_top == int8_top
    top2 = np.sort(fp32, axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= targets.decisive_margin
    fp32_accuracy, int8_accuracy = float((fp32_top == labels).mean()), float((int8_top == labels).mean())
    eps = 1e-12
    return {
        "images": n,
        "top1_agreement": float(agree.mean()),
        "decisive_images": int(decisive.sum()),
        "decisive_agreement": float(agree[decisive].mean()) if decisive.any() else None,
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": int8_accuracy,
        "accuracy_change": int8_accuracy - fp32_accuracy,
        "max_probability_change": float(np.abs(int8 - fp32).max()),
        # mean KL(FP32 || INT8): finer than agreement, which moves in steps of one image
        "kl_divergence": float(np.mean(np.sum(fp32 * (np.log(fp32 + eps) - np.log(int8 + eps)), 1))),
    }


def run_outputs(session, images: np.ndarray, names: tuple[str, ...] = ("probabilities",)) -> list[np.ndarray]:
    """The session's ``names`` outputs for ``images``, a batch at a time."""
    batches = [session.run(list(names), {INPUT_NAME: images[i:i + BATCH]}) for i in range(0, len(images), BATCH)]
    return [np.concatenate([b[k] for b in batches]) for k in range(len(names))]


def compare_files(fp32_session, int8_session, images: np.ndarray, labels: np.ndarray,
                  targets: Targets = TARGETS) -> dict:
    """The INT8 report's measure: ``fidelity`` and the heatmaps' correlation."""
    if len(images) == 0:
        return {**fidelity(images, images, labels, targets), "heatmap_correlation": None,
                "heatmap_correlation_target": HEATMAP_CORRELATION_TARGET}
    names = ("probabilities", "heatmaps")
    (fp32, fp32_maps), (int8, int8_maps) = run_outputs(fp32_session, images, names), run_outputs(int8_session, images, names)
    return {**fidelity(fp32, int8, labels, targets),
            "heatmap_correlation": heatmap_correlation(fp32_maps, int8_maps, fp32.argmax(1)),
            "heatmap_correlation_target": HEATMAP_CORRELATION_TARGET}


def heatmap_correlation(fp32_maps: np.ndarray, int8_maps: np.ndarray, top: np.ndarray) -> float | None:
    """Mean Pearson correlation of the INT8 and FP32 heatmaps of FP32's top class (None where a
    map has a single cell, or images whose maps are constant, leave nothing to correlate)."""
    rows = np.arange(len(top))
    a = fp32_maps[rows, top].reshape(len(top), -1)
    b = int8_maps[rows, top].reshape(len(top), -1)
    usable = (a.std(1) > 0) & (b.std(1) > 0)
    if a.shape[1] < 2 or not usable.any():
        return None
    return float(np.mean([stats.pearsonr(x, y).statistic for x, y in zip(a[usable], b[usable])]))


def describe(measured: dict) -> str:
    """One line of a measurement: the four figures the targets and the report speak of."""
    decisive = measured["decisive_agreement"]
    return (f"agreement {measured['top1_agreement']:.1%} ("
            + ("no decisive images" if decisive is None else
               f"{decisive:.1%} on {measured['decisive_images']} decisive")
            + f"), accuracy change {100 * measured['accuracy_change']:+.1f} points, "
            f"largest probability change {measured['max_probability_change']:.3f}")

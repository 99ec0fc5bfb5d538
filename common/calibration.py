"""Calibration maths, numpy and scipy only (the serving side imports it too).

- Expected calibration error (ECE) over 15 equal-width confidence bins, as in Guo et al. 2017
  ("On Calibration of Modern Neural Networks"): bin m holds the images whose top-1 probability
  lies in ((m - 1) / 15, m / 15]; ECE = sum over bins of (images in bin / N) x |accuracy -
  mean confidence|. ``reliability_bins`` gives the bins themselves (the reliability diagram);
  ``ece_if_calibrated`` the ECE a perfectly calibrated model would show on as few images.
- Negative log-likelihood and the Brier score (sum over classes of the squared error, mean
  over images), with percentile bootstrap intervals over images (scipy.stats.bootstrap).
- Temperature scaling: one scalar T per model, probabilities softmax(logits / T), T fitted by
  minimising the NLL on validation logits. The NLL is convex in 1 / T, so a bounded scalar
  search finds its one minimum.
- Selective classification (Geifman and El-Yaniv 2017): the risk-coverage curve, and the
  abstention threshold on the top probability chosen on validation so that the predictions
  kept reach a target accuracy with as many kept as possible.
- AUROC of the top probability between in-class and out-of-distribution images (the
  Mann-Whitney U statistic over the product of the two counts).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special, stats

BINS = 15
DEFAULT_TARGET_ACCURACY = 0.95
CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 1000
# Temperatures outside this range mean the logits carry no usable scale (e.g. a model that
# separates its validation images perfectly drives T to 0); the fit stops at the bounds.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
_TINY = 1e-12  # floor of a probability inside a log


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(logits / temperature), in float64."""
    return special.softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def top_confidence(probabilities) -> np.ndarray:
    return np.asarray(probabilities, np.float64).max(axis=1)


def correctness(probabilities, labels) -> np.ndarray:
    return np.asarray(probabilities).argmax(axis=1) == np.asarray(labels)


def nll(probabilities, labels) -> float:
    """Mean negative log-probability of the true class."""
    return float(per_image_nll(probabilities, labels).mean())


def per_image_nll(probabilities, labels) -> np.ndarray:
    p = np.asarray(probabilities, np.float64)
    return -np.log(np.maximum(p[np.arange(len(p)), np.asarray(labels)], _TINY))


def brier(probabilities, labels) -> float:
    """Mean over images of sum over classes (p_c - [c is the label])^2 (0 best, 2 worst)."""
    return float(per_image_brier(probabilities, labels).mean())


def per_image_brier(probabilities, labels) -> np.ndarray:
    p = np.asarray(probabilities, np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), np.asarray(labels)] = 1
    return ((p - onehot) ** 2).sum(axis=1)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin m - 1 (0-based) for confidence in ((m - 1) / bins, m / bins]; 0 goes to the first."""
    return np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability_bins(confidence, correct, bins: int = BINS) -> list[dict]:
    """Per equal-width bin: its edges, how many images fall in it, their mean confidence and
    their accuracy (None for an empty bin)."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    index = _bin_index(confidence, bins)
    out = []
    for m in range(bins):
        inside = index == m
        n = int(inside.sum())
        out.append({"low": m / bins, "high": (m + 1) / bins, "count": n,
                    "confidence": float(confidence[inside].mean()) if n else None,
                    "accuracy": float(correct[inside].mean()) if n else None})
    return out


def ece(confidence, correct, bins: int = BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins (see the module docstring)."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    if not len(confidence):
        return float("nan")
    index = _bin_index(confidence, bins)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, bins) - np.bincount(index, confidence, bins))
    return float(gap.sum() / counts.sum())  # sum_m n_m / N * |acc_m - conf_m| = sum_m |S_acc - S_conf| / N


def ece_if_calibrated(confidence, bins: int = BINS, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model with these confidences would still show on this many
    images: each image right with probability equal to its confidence, drawn ``resamples``
    times ("consistency resampling", Broecker and Smith 2007). The binned ECE is biased upwards
    on small sets (about 0.12 on 80 images spread over 0.3-1): an ECE inside this range is
    as calibrated as the images can show. Returns the mean and the 95th percentile."""
    confidence = np.asarray(confidence, np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.random((resamples, len(confidence))) < confidence
    values = np.array([ece(confidence, d, bins) for d in draws])
    return {"mean": float(values.mean()), "p95": float(np.percentile(values, 95)), "resamples": resamples}


@dataclass
class Interval:
    value: float
    low: float | None  # the percentile bootstrap interval (None: too few images)
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap(statistic, *per_image, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval:
    """``statistic(*per_image)`` with its 95% percentile bootstrap interval, resampling images
    (the arrays are resampled together). Percentile, not BCa: ECE is a binned, non-smooth
    statistic for which the jackknife behind BCa is unreliable."""
    arrays = [np.asarray(a) for a in per_image]
    value = float(statistic(*arrays))
    n = len(arrays[0])
    if n < 2:
        return Interval(value, None, None, n)
    result = stats.bootstrap(arrays, statistic, paired=True, vectorized=False, n_resamples=resamples,
                             confidence_level=CONFIDENCE_LEVEL, method="percentile",
                             random_state=np.random.default_rng(seed))
    return Interval(value, float(result.confidence_interval.low), float(result.confidence_interval.high), n)


def fit_temperature(logits, labels) -> float:
    """The T minimising the NLL of softmax(logits / T) on these labelled logits."""
    z = np.asarray(logits, np.float64)
    true = z[np.arange(len(z)), np.asarray(labels)]

    def mean_nll(beta: float) -> float:  # beta = 1 / T: the NLL is convex in it
        return float((special.logsumexp(beta * z, axis=1) - beta * true).mean())

    found = optimize.minimize_scalar(mean_nll, bounds=(1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE),
                                     method="bounded", options={"xatol": 1e-7})
    return float(1 / found.x)


@dataclass
class Threshold:
    """Keep a prediction when its top probability is >= ``threshold``; else the model is unsure."""

    threshold: float
    target_accuracy: float
    reached: bool  # whether any threshold reached the target on these images
    coverage: float  # share of these images kept
    accuracy: float | None  # accuracy of the kept ones (None: none kept)
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def _ranked(confidence, correct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidences high to low, the accuracy of the k most confident, and where each group of
    equal confidences ends (a threshold keeps all of a tie or none of it)."""
    confidence = np.asarray(confidence, np.float64)
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    kept_accuracy = np.cumsum(np.asarray(correct, np.float64)[order]) / np.arange(1, len(order) + 1)
    group_ends = np.flatnonzero(np.append(sorted_conf[1:] != sorted_conf[:-1], True))
    return sorted_conf, kept_accuracy, group_ends


def abstention_threshold(confidence, correct, target: float = DEFAULT_TARGET_ACCURACY) -> Threshold:
    """The lowest threshold whose kept predictions reach ``target`` accuracy on these images
    (so the most predictions kept): 0.0 when all of them together reach it; 1.0 when none
    does, which makes the model unsure of (almost) everything. It lies halfway between the
    least confident image kept and the most confident one dropped, so that the rounding of
    another runtime (float32 ONNX, logits written as text) moves no image across it."""
    if not 0 < target <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target}")
    n = len(confidence)
    if n == 0:
        return Threshold(1.0, target, False, 0.0, None, 0)
    sorted_conf, kept_accuracy, ends = _ranked(confidence, correct)
    meets = ends[kept_accuracy[ends] >= target - 1e-12]  # float sums of 0/1: exact target counts
    if not len(meets):
        return Threshold(1.0, target, False, 0.0, None, n)
    last = int(meets.max())
    threshold = 0.0 if last == n - 1 else float((sorted_conf[last] + sorted_conf[last + 1]) / 2)
    return Threshold(threshold, target, True, (last + 1) / n, float(kept_accuracy[last]), n)


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy of the kept predictions) as the threshold falls through each
    distinct confidence: from the most confident group of images to all of them."""
    if not len(confidence):
        return np.empty(0), np.empty(0)
    _, kept_accuracy, ends = _ranked(confidence, correct)
    return (ends + 1) / len(confidence), kept_accuracy[ends]


def selective(confidence, correct, threshold: float) -> dict:
    """What a threshold does on these images: share kept and accuracy of those kept."""
    confidence = np.asarray(confidence, np.float64)
    kept = confidence >= threshold
    n = len(confidence)
    return {"coverage": float(kept.mean()) if n else None,
            "accuracy": float(np.asarray(correct)[kept].mean()) if kept.any() else None, "n": n}


def auroc(in_distribution, out_of_distribution) -> float:
    """P(an in-class image's confidence > an out-of-distribution image's), ties half: 1.0 the
    confidence separates them perfectly, 0.5 not at all."""
    a, b = np.asarray(in_distribution, np.float64), np.asarray(out_of_distribution, np.float64)
    if not len(a) or not len(b):
        return float("nan")
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic  # U of the first sample
    return float(u / (len(a) * len(b)))

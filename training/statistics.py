"""What the data can support: intervals and paired tests for comparing classifiers.

Distributions and tests come from scipy.stats; this module only chooses and combines them:
- a Student t interval for a metric's mean over repeated runs (seeds or folds);
- a Wilson interval for one run's accuracy over its images;
- McNemar's exact test on per-image correctness of two models on the same images (each image
  counted once), with a paired interval for the accuracy difference;
- a paired t-test over runs when there are at least three.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
MIN_RUNS_FOR_T_TEST = 3


@dataclass
class Estimate:
    mean: float
    std: float | None  # over runs (ddof 1); None for one run
    low: float | None  # the 95% interval, or None where none can be given
    high: float | None
    n: int  # runs, or images for a Wilson interval
    method: str  # how the interval was made

    def as_dict(self) -> dict:
        return asdict(self)


def over_runs(values) -> Estimate:
    """Mean, standard deviation and t interval of one metric over repeated runs."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return Estimate(float(values[0]), None, None, None, 1, "one run")
    mean, std = float(values.mean()), float(values.std(ddof=1))
    if std == 0:
        return Estimate(mean, 0.0, mean, mean, len(values), f"t over {len(values)} runs")
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=stats.sem(values))
    return Estimate(mean, std, float(low), float(high), len(values), f"t over {len(values)} runs")


def wilson(correct: int, total: int) -> Estimate:
    """One accuracy over ``total`` images with its Wilson score interval."""
    ci = stats.binomtest(int(correct), int(total)).proportion_ci(CONFIDENCE, method="wilson")
    return Estimate(correct / total, None, float(ci.low), float(ci.high), int(total),
                    f"Wilson over {total} images")


@dataclass
class Paired:
    """Model A minus model B: accuracy difference (points), its 95% interval and a p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str
    n: int  # images (McNemar) or runs (t-test)
    a_only: int | None = None  # images only A got right (McNemar's b)
    b_only: int | None = None  # images only B got right (McNemar's c)

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar(a_correct, b_correct) -> Paired:
    """McNemar's exact test on the discordant images (an exact binomial test of b against
    b + c at 0.5), with a paired t interval for the difference of the two accuracies."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    discordant = a_only + b_only
    p = stats.binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    difference = a.astype(float) - b.astype(float)
    low, high = _mean_interval(difference)
    return Paired(100 * difference.mean(), 100 * low, 100 * high, float(p),
                  "McNemar exact test", len(a), a_only, b_only)


def paired_t(a_runs, b_runs) -> Paired:
    """A paired t-test of two models' accuracies over the same runs (seeds or folds)."""
    a, b = np.asarray(a_runs, dtype=float), np.asarray(b_runs, dtype=float)
    difference = a - b
    low, high = _mean_interval(difference)
    if np.all(difference == difference[0]):
        p = 1.0 if difference[0] == 0 else math.nan  # no spread: t is undefined
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    return Paired(100 * difference.mean(), 100 * low, 100 * high, p,
                  f"paired t-test over {len(a)} runs", len(a))


def _mean_interval(values: np.ndarray) -> tuple[float, float]:
    """The t interval of a mean (a point when every value is equal)."""
    mean = float(values.mean())
    if len(values) < 2 or np.all(values == values[0]):
        return mean, mean
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=stats.sem(values))
    return float(low), float(high)


def format_p(p: float, prefix: str = "p ") -> str:
    """``p < 0.001``, ``p = 0.023``; with ``prefix=""``: ``< 0.001``, ``0.023``."""
    if math.isnan(p):
        return f"{prefix}undefined"
    if p < 0.001:
        return f"{prefix}< 0.001"
    return f"{prefix}= {p:.3f}" if prefix else f"{p:.3f}"


def sentence(a: str, b: str, result: Paired) -> str:
    """One plain sentence; ``a`` is the model with the higher accuracy (difference >= 0)."""
    ci = f"95% CI {result.low:.1f} to {result.high:.1f}, {format_p(result.p_value)}"
    if result.p_value < ALPHA:
        return f"{a} beats {b} by {result.difference:.1f} points ({ci})."
    return f"{a} vs {b}: {result.difference:+.1f} points ({ci}); the data cannot tell them apart."

"""What the data can support: intervals and paired tests for comparing classifiers (torch-free).

The training comparison (``training.comparison``) and ``serve.evaluate`` use these functions
and the same sentences. Distributions come from scipy.stats; this module chooses and combines
them, and every pairwise result says what it generalises over (``covers``):

- ``IMAGES``: the sampling of images, with the trained weights held fixed. Training randomness
  (initialisation, augmentation, batch order) is not covered: with one or two runs nothing can
  say whether another training run would reverse the result.
- ``IMAGES_AND_RUNS``: both the sampling of images and training randomness (3 or more runs).
- ``IMAGES_AND_FOLDS``: images and training sets, over cross-validation folds.

Per model: ``wilson`` (one run's accuracy over its images), ``over_runs`` (a metric's mean over
runs, t interval). Per pair (A minus B, accuracy points), one test decides and its interval is
built from that same test, so "the interval excludes 0" and "p < 0.05" always agree:

- ``over_images``: the exact paired test on per-image correctness. With one run it is
  McNemar's exact test; with several runs on the same images, the exact sign-flip test that
  swaps the two models on an image in every run at once.
- ``over_runs_and_images``: several runs on the same images (runs x images crossed), a t test
  whose variance holds both sources (Owen 2007); ``over_runs_and_images_and_exact`` decides
  with it and the exact test together (a claim needs both).
- ``over_folds``: Nadeau and Bengio's corrected resampled t-test over cross-validation folds.
- ``holm``: Holm's step-down adjustment over the pairs of one split.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import optimize, signal, stats

ALPHA = 0.05  # exactly the number a reader compares p with
CONFIDENCE = 1 - ALPHA
MIN_RUNS = 3  # fewer runs per model cannot estimate training randomness

IMAGES = "images"
IMAGES_AND_RUNS = "images and training runs"
IMAGES_AND_FOLDS = "images and training sets (folds)"
COVERS = {
    IMAGES: "This covers the sampling of images, not training randomness: another training run "
            "could change it.",
    IMAGES_AND_RUNS: "This covers both the sampling of images and training randomness.",
    IMAGES_AND_FOLDS: "This covers the sampling of images and of training sets (over the folds).",
}


@dataclass
class Estimate:
    mean: float
    std: float | None  # over runs (ddof 1); None for one run
    low: float | None  # the 95% interval, or None where none can be given
    high: float | None
    n: int  # runs, or images for a Wilson interval
    method: str  # how the interval was made, or why there is none

    def as_dict(self) -> dict:
        return asdict(self)


def over_runs(values, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """Mean, standard deviation and t interval of one metric over repeated runs (training
    randomness on the same images), clipped to the metric's ``bounds``. No interval from fewer
    than MIN_RUNS runs (two give one degree of freedom: an accuracy interval far outside 0 to 1)
    or from runs that do not differ at all (a zero-width interval would claim a certainty that a
    few runs cannot give)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return Estimate(float(values[0]), None, None, None, 1, "one run")
    mean, std = float(values.mean()), float(values.std(ddof=1))
    if len(values) < MIN_RUNS:
        return Estimate(mean, std, None, None, len(values), f"{len(values)} runs: too few for an interval")
    if np.ptp(values) == 0:
        return Estimate(mean, 0.0, None, None, len(values), f"no spread over {len(values)} runs")
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=stats.sem(values))
    return Estimate(mean, std, float(max(low, bounds[0])), float(min(high, bounds[1])), len(values),
                    f"t over {len(values)} runs")


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
    covers: str  # IMAGES, IMAGES_AND_RUNS or IMAGES_AND_FOLDS
    images: int
    runs: int
    a_ahead: int | None = None  # images where A is ahead (one run: right where B is wrong)
    b_ahead: int | None = None
    p_fresh_run: float | None = None  # P(a fresh run of A beats a fresh run of B on new images)
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _correctness(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.atleast_2d(np.asarray(a_correct, dtype=bool)), np.atleast_2d(np.asarray(b_correct, dtype=bool))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"the two models' correctness differ in shape: {a.shape} and {b.shape}")
    return a, b


def _lead_tails(levels: np.ndarray, lead: int, share: float) -> tuple[float, float]:
    """P(L <= lead), P(L >= lead) where L = sum_j j X_j, X_j ~ Binomial(levels[j], share):
    the total lead of A over the images where one model is ahead, when each such image is A's
    with probability ``share`` (independently). One run: McNemar's binomial, from scipy."""
    if len(levels) == 2:
        m = int(levels[1])
        return float(stats.binom.cdf(lead, m, share)), float(stats.binom.sf(lead - 1, m, share))
    pmf = np.ones(1)
    for j, k in enumerate(levels):
        if j and k:
            spread = np.zeros(j * int(k) + 1)
            spread[::j] = stats.binom.pmf(np.arange(k + 1), k, share)
            pmf = signal.convolve(pmf, spread)  # exact sum of independent scaled binomials
    pmf = np.clip(pmf, 0, None)
    return float(min(1.0, pmf[:lead + 1].sum())), float(min(1.0, pmf[lead:].sum()))


def over_images(a_correct, b_correct) -> Paired:
    """The exact paired test on per-image correctness, and the interval that inverts it.

    ``a_correct``, ``b_correct``: booleans, one run (n images) or runs x images (the same
    images in every run). Per image, s = (A right) - (B right) summed over the runs. Under the
    null hypothesis the two models are exchangeable on each image, so each nonzero s is equally
    likely to have either sign (the exact sign-flip permutation distribution of the total lead,
    computed by convolution). With one run this is McNemar's exact test: b images only A got
    right, c only B, b ~ Binomial(b + c, 1/2) given b + c.

    The interval: the difference is ``w * (2q - 1)``, with ``q`` the chance that an image where
    one model is ahead is A's, and ``w`` how much the models differ per image (one run: the
    share of discordant images; several: the mean |s| / runs). For ``q``: the values not
    rejected by either exact one-sided test at 2.5% (one run: Clopper-Pearson on b / (b + c)),
    which is what inverts the test; for ``w``: the Clopper-Pearson interval of W / runs of n
    (W the summed |s|; with several runs W / runs need not be whole, and the beta form of the
    interval is used as it stands). The difference's interval spans w * (2q - 1) over both, so
    it excludes 0 exactly when the interval of q excludes 1/2, that is when p < 0.05, and it
    does not end at the estimate when one model is never ahead (as the interval conditional on
    W would: b = 20, c = 0 of 60 cannot bound the difference at 33.3 points). Holding w at its
    estimate is the conditional interval; spanning w's interval too makes it wider, not narrower.
    The two-sided p is twice the smaller tail at q = 1/2 (one run: scipy's and statsmodels'
    exact McNemar p). With no image where a model is ahead, it is +-w's upper bound: never a
    zero-width interval.
    """
    a, b = _correctness(a_correct, b_correct)
    runs, n = a.shape
    s = (a.astype(np.int64) - b.astype(np.int64)).sum(0)
    levels = np.bincount(np.abs(s), minlength=runs + 1)
    total, lead = int(np.abs(s).sum()), int(s[s > 0].sum())
    test = "McNemar exact test" if runs == 1 else f"exact sign-flip test over images ({runs} runs)"
    a_ahead, b_ahead = int((s > 0).sum()), int((s < 0).sum())
    share = total / runs  # W / runs of n: Clopper-Pearson interval of how much the models differ
    w_low = float(stats.beta.ppf(ALPHA / 2, share, n - share + 1)) if share > 0 else 0.0
    w_high = float(stats.beta.ppf(1 - ALPHA / 2, share + 1, n - share)) if share < n else 1.0
    if total == 0:
        return Paired(0.0, -100 * w_high, 100 * w_high, 1.0, test, IMAGES, n, runs, 0, 0,
                      note=f"neither model is ahead on any of the {n} images; the interval bounds "
                           "how often one could be")
    lower, upper = _lead_tails(levels, lead, 0.5)
    p = min(1.0, 2 * min(lower, upper))
    # Each bound is searched on the side of 1/2 that the test at 1/2 decides, so the interval
    # and the p-value cannot disagree through rounding.
    if lead == 0:
        q_low = 0.0
    elif upper < ALPHA / 2:
        q_low = max(np.nextafter(0.5, 1), _root(lambda q: _lead_tails(levels, lead, q)[1] - ALPHA / 2, 0.5, 1.0))
    else:
        q_low = _root(lambda q: _lead_tails(levels, lead, q)[1] - ALPHA / 2, 0.0, 0.5)
    if lead == total:
        q_high = 1.0
    elif lower < ALPHA / 2:
        q_high = min(np.nextafter(0.5, 0), _root(lambda q: _lead_tails(levels, lead, q)[0] - ALPHA / 2, 0.0, 0.5))
    else:
        q_high = _root(lambda q: _lead_tails(levels, lead, q)[0] - ALPHA / 2, 0.5, 1.0)
    low, high = 2 * q_low - 1, 2 * q_high - 1
    low *= w_high if low < 0 else w_low
    high *= w_high if high > 0 else w_low
    return Paired(float(100 * s.sum() / (runs * n)), 100 * low, 100 * high, float(p),
                  test, IMAGES, n, runs, a_ahead, b_ahead)


def _root(f, low: float, high: float) -> float:
    if f(low) == 0:
        return low
    if f(high) == 0:
        return high
    return float(optimize.brentq(f, low, high, xtol=1e-14))


def over_runs_and_images(a_correct, b_correct) -> Paired:
    """A paired test over runs and images at once: R >= 3 runs of each model (paired by run),
    each scored on the same n images, so runs and images are crossed.

    Per run r and image i, d = (A right) - (B right). The variance of the mean difference is
    sigma_run^2 / R + sigma_image^2 / n + sigma_residual^2 / (R n), the crossed random-effects
    decomposition of Owen (2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2), 386-411,
    section 2), each component estimated from the two-way ANOVA mean squares and truncated at
    zero; the t distribution takes Satterthwaite's (1946) degrees of freedom. So image sampling
    (shared by every run) and training randomness (run to run) are both in the interval, and
    the interval and the p-value come from the same t.

    ``p_fresh_run``: the estimated probability that one fresh training run of A scores higher
    than one fresh run of B on n new images like these, the "probability of outperforming" of
    Bouthillier et al. (2021, "Accounting for variance in machine learning benchmarks", MLSys):
    from the same model, with the uncertainty of the mean added.

    When every d is the same (no spread of any kind) there is no variance to estimate; the exact
    test over images (``over_images``) decides instead, and ``note`` says so.
    """
    a, b = _correctness(a_correct, b_correct)
    runs, n = a.shape
    d = a.astype(float) - b.astype(float)
    if runs < 2 or n < 2 or np.all(d == d.flat[0]):
        result = over_images(a, b)
        result.note = "every run and image gives the same difference, so no run-to-run spread can be estimated"
        return result
    grand, run_means, image_means = d.mean(), d.mean(1), d.mean(0)
    df_runs, df_images, df_resid = runs - 1, n - 1, (runs - 1) * (n - 1)
    ms_runs = n * ((run_means - grand) ** 2).sum() / df_runs
    ms_images = runs * ((image_means - grand) ** 2).sum() / df_images
    ms_resid = ((d - run_means[:, None] - image_means[None, :] + grand) ** 2).sum() / df_resid
    var_run, var_image = max(0.0, (ms_runs - ms_resid) / n), max(0.0, (ms_images - ms_resid) / runs)
    # The same variance as a combination of mean squares, for Satterthwaite's degrees of freedom.
    keep_run, keep_image = ms_runs > ms_resid, ms_images > ms_resid
    terms = [(keep_run * ms_runs, df_runs), (keep_image * ms_images, df_images),
             ((1 - keep_run - keep_image) * ms_resid, df_resid)]
    se2 = sum(c for c, _ in terms) / (runs * n)
    df = (se2 * runs * n) ** 2 / sum(c ** 2 / k for c, k in terms if c)
    se = math.sqrt(se2)
    t_value = grand / se
    p = float(2 * stats.t.sf(abs(t_value), df))
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * se
    fresh_sd = math.sqrt(var_run + (var_image + ms_resid) / n + se2)
    s = d.sum(0)
    return Paired(float(100 * grand), float(100 * (grand - half)), float(100 * (grand + half)), p,
                  f"t over {runs} runs x {n} images (crossed)", IMAGES_AND_RUNS, n, runs,
                  int((s > 0).sum()), int((s < 0).sum()), float(stats.t.cdf(grand / fresh_sd, df)))


def over_runs_and_images_and_exact(a_correct, b_correct) -> Paired:
    """The deciding result with several runs: the more cautious of ``over_runs_and_images``
    (which holds training randomness, but leans on a t approximation) and the exact test over
    images (which holds however few images the models differ on). A claim needs both (an
    intersection-union test, so still at level 0.05): p is the larger, and the interval spans
    both, so it excludes 0 exactly when both do."""
    crossed = over_runs_and_images(a_correct, b_correct)
    if crossed.covers != IMAGES_AND_RUNS:  # no spread: the exact test over images already decides
        return crossed
    images = over_images(a_correct, b_correct)
    if images.low >= crossed.low and images.high <= crossed.high and images.p_value <= crossed.p_value:
        return crossed
    return replace(crossed, low=min(crossed.low, images.low), high=max(crossed.high, images.high),
                   p_value=max(crossed.p_value, images.p_value),
                   test=f"{crossed.test} and {images.test}",
                   note="the exact test over images is the more cautious here, so the interval and p "
                        "take it into account")


def over_folds(a_folds, b_folds, pool: int) -> Paired:
    """Nadeau and Bengio's corrected resampled t-test (Machine Learning 52, 239-281, 2003) over
    K cross-validation folds: the folds' training sets overlap, so the plain t-test over folds
    is too liberal; the variance of the mean difference is (1/K + n_val / n_train) s^2.

    ``a_folds``, ``b_folds``: per fold, the models' per-image correctness on that fold's
    validation images; ``pool``: the images the folds were cut from. Folds whose differences do
    not vary at all leave no variance to estimate; the exact test on the pooled images
    (``over_images``, each image once) decides instead, and ``note`` says so.
    """
    a_folds = [np.asarray(x, dtype=bool) for x in a_folds]
    b_folds = [np.asarray(x, dtype=bool) for x in b_folds]
    k = len(a_folds)
    sizes = np.array([len(x) for x in a_folds])
    # From integer counts, so equal differences are equal to the last bit.
    d = np.array([(int(a.sum()) - int(b.sum())) / len(a) for a, b in zip(a_folds, b_folds)])
    if k < 2 or np.ptp(d) == 0:
        result = over_images(np.concatenate(a_folds), np.concatenate(b_folds))
        result.note = "the folds' differences do not vary, so the corrected t-test cannot be used"
        return result
    ratio = float(np.mean(sizes / (pool - sizes)))
    se = math.sqrt((1 / k + ratio) * d.var(ddof=1))
    t_value = d.mean() / se
    p = float(2 * stats.t.sf(abs(t_value), k - 1))
    half = float(stats.t.ppf(1 - ALPHA / 2, k - 1)) * se
    a_all, b_all = np.concatenate(a_folds), np.concatenate(b_folds)
    return Paired(float(100 * d.mean()), float(100 * (d.mean() - half)), float(100 * (d.mean() + half)), p,
                  f"corrected resampled t-test over {k} folds", IMAGES_AND_FOLDS, int(sizes.sum()), k,
                  int((a_all & ~b_all).sum()), int((~a_all & b_all).sum()))


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error at most alpha over the family).
    Written here because scipy.stats has no Holm adjustment and the serving side must not need
    statsmodels (whose ``multipletests(method="holm")`` the tests compare against)."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def format_p(p: float, prefix: str = "p ") -> str:
    """``p < 0.001``, ``p = 0.023``; with ``prefix=""``: ``< 0.001``, ``0.023``. Digits are
    added where rounding would put p on the other side of 0.05 (0.0499 is not "0.050")."""
    if math.isnan(p):
        return f"{prefix}undefined"
    if p < 0.001:
        return f"{prefix}< 0.001"
    digits = 3
    while digits < 8 and (float(f"{p:.{digits}f}") < ALPHA) != (p < ALPHA):
        digits += 1
    return f"{prefix}= {p:.{digits}f}" if prefix else f"{p:.{digits}f}"


def format_points(x: float) -> str:
    """One decimal, with more digits where one would print a nonzero bound as 0.0 (an interval
    that excludes 0 must not read as if it touched it)."""
    text = f"{x:.1f}"
    if x != 0 and float(text) == 0:
        text = f"{x:.2g}"
    return text


def format_chance(p: float) -> str:
    """A probability to two decimals, never a rounded certainty ("> 0.99", not "1.00")."""
    return "> 0.99" if p > 0.995 else "< 0.01" if p < 0.005 else f"{p:.2f}"


def format_interval(result: Paired) -> str:
    return f"95% CI {format_points(result.low)} to {format_points(result.high)}"


def sentence(a: str, b: str, result: Paired, p_adjusted: float | None = None, family: int = 1) -> str:
    """What the data supports about one pair, with what it generalises over. ``a`` is the model
    ahead (difference >= 0). With ``family`` > 1 pairs, the verdict rests on Holm's adjusted p."""
    adjusted = result.p_value if p_adjusted is None or family == 1 else p_adjusted
    p_text = format_p(result.p_value)
    if family > 1:
        p_text += f", Holm-adjusted over {family} pairs {format_p(adjusted, prefix='')}"
    numbers = f"({format_interval(result)}; {p_text})"
    if adjusted < ALPHA:
        verdict = f"{a} beats {b} by {format_points(result.difference)} points {numbers}."
    elif result.p_value < ALPHA:
        verdict = (f"{a} vs {b}: {result.difference:+.1f} points {numbers}; this pair alone would "
                   f"pass, but not after correcting for {family} comparisons, so the data do not "
                   "support a claim.")
    else:
        verdict = f"{a} vs {b}: {result.difference:+.1f} points {numbers}; the data cannot tell them apart."
    text = f"{verdict} {COVERS[result.covers]}"
    if result.p_fresh_run is not None:
        text += (f" Estimated chance that a fresh training run of {a} scores higher than one of {b} "
                 f"on {result.images} new images like these: {format_chance(result.p_fresh_run)}.")
    if result.note:
        text += f" (Note: {result.note}.)"
    return text

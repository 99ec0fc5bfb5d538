"""common.statistics against independent references (statsmodels, scipy, published examples)
and the properties the comparison's sentences rely on."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from common import statistics


def one_run(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return np.array(a), np.array(b)


# --- one run: McNemar's exact test and the interval that inverts it -------------------------------

@pytest.mark.parametrize("table", [(30, 1, 9, 0), (100, 9, 2, 49), (50, 0, 6, 10), (20, 13, 13, 4), (5, 7, 0, 1)])
def test_mcnemar_matches_statsmodels_and_the_interval_is_clopper_pearson(table):
    both, a_only, b_only, neither = table
    a, b = one_run(*table)
    result = statistics.over_images(a, b)
    n, m = len(a), a_only + b_only
    reference = sm_mcnemar([[both, a_only], [b_only, neither]], exact=True)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert (result.a_ahead, result.b_ahead, result.images, result.runs) == (a_only, b_only, n, 1)
    assert result.difference == pytest.approx(100 * (a_only - b_only) / n)
    q_low, q_high = proportion_confint(a_only, m, alpha=0.05, method="beta")  # Clopper-Pearson on b / (b + c)
    w_low, w_high = proportion_confint(m, n, alpha=0.05, method="beta")  # how often the models differ
    low = (2 * q_low - 1) * (w_high if q_low < 0.5 else w_low)
    high = (2 * q_high - 1) * (w_high if q_high > 0.5 else w_low)
    assert (result.low, result.high) == pytest.approx((100 * low, 100 * high), abs=1e-9)
    assert result.test == "McNemar exact test" and result.covers == statistics.IMAGES


def test_the_textbook_exact_mcnemar_value():
    # 1 image only A right, 9 only B: p = 2 * P(X <= 1), X ~ B(10, 1/2) = 22 / 1024.
    result = statistics.over_images(*one_run(30, 1, 9, 0))
    assert result.p_value == pytest.approx(22 / 1024, abs=1e-15)


def test_the_interval_and_the_test_agree_over_a_grid():
    """"The interval excludes 0" and "p < 0.05" never disagree (the old t interval did: 9 / 2 of
    160 gave 0.3 to 8.4 with p = 0.065)."""
    checked = 0
    for n in (10, 40, 160, 1000):
        for a_only, b_only in itertools.product(range(0, 26), repeat=2):
            if a_only + b_only > n:
                continue
            result = statistics.over_images(*one_run(n - a_only - b_only, a_only, b_only, 0))
            excludes = result.low > 0 or result.high < 0
            assert excludes == (result.p_value < statistics.ALPHA), (n, a_only, b_only, result)
            assert result.low <= result.difference <= result.high and result.low < result.high
            checked += 1
    assert checked > 2000
    old_counterexample = statistics.over_images(*one_run(100, 9, 2, 49))
    assert old_counterexample.low < 0 and old_counterexample.p_value > 0.05


def test_the_interval_covers_the_true_difference():
    """Simulated: 160 images, 5% only A right, 1.25% only B (the reading that had a t interval
    contradict its test). Holding b + c at its estimate (the conditional interval) covers the
    true difference only about 83% of the time here; this one must cover at least 95%."""
    rng = np.random.default_rng(6)
    truth, hits, reps = 100 * (0.05 - 0.0125), 0, 300
    for _ in range(reps):
        u = rng.random(160)
        result = statistics.over_images(u < 0.05, (u >= 0.05) & (u < 0.0625))
        hits += result.low <= truth <= result.high
    assert hits / reps >= 0.95


def test_several_runs_agree_with_their_test_and_reduce_to_mcnemar():
    rng = np.random.default_rng(0)
    disagreements = 0
    for trial in range(300):
        runs, n = int(rng.integers(2, 5)), int(rng.integers(5, 80))
        a = rng.random((runs, n)) < rng.uniform(0.3, 0.9)
        b = rng.random((runs, n)) < rng.uniform(0.3, 0.9)
        result = statistics.over_images(a, b)
        assert result.difference == pytest.approx(100 * (a.mean() - b.mean()))  # the table's mean difference
        disagreements += (result.low > 0 or result.high < 0) != (result.p_value < 0.05)
        assert result.low < result.high
    assert disagreements == 0
    # Two runs giving the same per-image answers: the lead doubles on the same images, and the
    # exact sign-flip distribution is McNemar's scaled by 2: the same p.
    a, b = one_run(40, 8, 1, 11)
    assert statistics.over_images(np.stack([a, a]), np.stack([b, b])).p_value == \
        pytest.approx(statistics.over_images(a, b).p_value)


def test_sign_flip_p_by_enumeration():
    # Per-image leads summed over 2 runs: +2, +2, +1, -1, +1 (and zeros). Enumerate all 2^5 sign
    # flips: p = 2 * P(total >= observed) under the null.
    a = np.array([[1, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0]], bool)
    b = np.array([[0, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1, 0]], bool)
    leads = (a.astype(int) - b.astype(int)).sum(0)
    nonzero = leads[leads != 0]
    observed = nonzero.sum()
    totals = [sum(s * abs(x) for s, x in zip(signs, nonzero)) for signs in itertools.product((1, -1), repeat=len(nonzero))]
    expected = min(1.0, 2 * np.mean([t >= observed for t in totals]))
    assert statistics.over_images(a, b).p_value == pytest.approx(expected)


def test_no_discordant_image_gives_a_bound_not_a_point():
    a, b = one_run(120, 0, 0, 40)
    result = statistics.over_images(a, b)
    assert result.difference == 0 and result.p_value == 1.0
    # 0 of 160: the Clopper-Pearson upper bound on how often the models differ.
    upper = proportion_confint(0, 160, alpha=0.05, method="beta")[1]
    assert (result.low, result.high) == pytest.approx((-100 * upper, 100 * upper))
    assert "cannot tell them apart" in statistics.sentence("A", "B", result)


# --- runs x images -----------------------------------------------------------------------------------

def _crossed_cases():
    """Runs x images: independent answers; images that are hard for every run (an image effect);
    and both an image effect and run-to-run shifts, so each variance component is exercised."""
    rng = np.random.default_rng(1)
    yield rng.random((4, 60)) < 0.8, rng.random((4, 60)) < 0.6
    hard = rng.random(60)
    yield (np.stack([hard < 0.8 + 0.05 * rng.standard_normal(60) for _ in range(4)]),
           np.stack([hard < 0.6 + 0.05 * rng.standard_normal(60) for _ in range(4)]))
    yield (np.stack([hard < shift + 0.05 * rng.standard_normal(60) for shift in (0.6, 0.9, 0.7, 0.85)]),
           np.stack([hard < 0.6 + 0.05 * rng.standard_normal(60) for _ in range(4)]))


@pytest.mark.parametrize("case", range(3))
def test_runs_and_images_variance_against_a_brute_force_decomposition(case):
    a, b = list(_crossed_cases())[case]
    result = statistics.over_runs_and_images(a, b)
    d = a.astype(float) - b.astype(float)
    runs, n = d.shape
    # Two-way ANOVA without replication (the textbook one, written out again here).
    grand = d.mean()
    ss_rows = n * ((d.mean(1) - grand) ** 2).sum()
    ss_cols = runs * ((d.mean(0) - grand) ** 2).sum()
    ss_err = ((d - grand) ** 2).sum() - ss_rows - ss_cols
    ms = [ss_rows / (runs - 1), ss_cols / (n - 1), ss_err / ((runs - 1) * (n - 1))]
    var = (max(ms[0], ms[2]) + max(ms[1], ms[2]) - ms[2]) / (runs * n)
    assert result.test.startswith("t over 4 runs x 60 images")
    assert result.covers == statistics.IMAGES_AND_RUNS
    assert result.difference == pytest.approx(100 * grand)
    # Satterthwaite's df for that combination of mean squares.
    dfs = [runs - 1, n - 1, (runs - 1) * (n - 1)]
    coefs = [ms[0] > ms[2], ms[1] > ms[2], 1 - (ms[0] > ms[2]) - (ms[1] > ms[2])]
    dof = (var * runs * n) ** 2 / sum((c * m) ** 2 / k for c, m, k in zip(coefs, ms, dfs) if c)
    se = 100 * math.sqrt(var)
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(100 * grand) / se, dof), rel=1e-9)
    half = stats.t.ppf(0.975, dof) * se
    assert (result.low, result.high) == pytest.approx((100 * grand - half, 100 * grand + half))
    assert 0 < result.p_fresh_run < 1


def test_runs_and_images_sees_image_sampling_the_t_test_over_runs_misses():
    """A ahead on the same 5 of 160 images in every seed, plus seed-to-seed noise elsewhere that
    cancels: a t-test over the runs' accuracies sees almost no spread and calls it certain; the
    crossed test sees that 5 images are few."""
    rng = np.random.default_rng(2)
    runs, n = 3, 160
    a = np.zeros((runs, n), bool)
    b = np.zeros((runs, n), bool)
    a[:, :5] = True
    for r in range(runs):  # 10 more images each model gets right, different per run
        a[r, rng.choice(np.arange(5, n), 10, replace=False)] = True
        b[r, rng.choice(np.arange(5, n), 10, replace=False)] = True
    result = statistics.over_runs_and_images(a, b)
    accuracies = a.mean(1) - b.mean(1)
    assert np.ptp(accuracies) == 0  # the same difference in every seed: the degenerate t-test
    assert result.low < result.difference < result.high and result.high - result.low > 1
    assert result.p_value > 1e-6


def test_zero_spread_is_never_a_zero_width_interval():
    # A right on every image in every run, B on none: nothing varies.
    a, b = np.ones((3, 50), bool), np.zeros((3, 50), bool)
    result = statistics.over_runs_and_images(a, b)
    assert result.high > result.low and result.difference == 100
    assert result.p_value < 0.05 and result.low > 0 and result.note
    assert "beats" in statistics.sentence("A", "B", result)
    # Identical models in every run: difference 0, an interval around it, "cannot tell".
    same = statistics.over_runs_and_images(a, a)
    assert same.low < 0 < same.high and same.p_value == 1.0
    # The same lead on the same images in every seed is not "p undefined".
    a2 = np.zeros((3, 160), bool)
    a2[:, :10] = True
    b2 = np.zeros((3, 160), bool)
    lead = statistics.over_runs_and_images(a2, b2)
    assert lead.low > 0 and lead.p_value < 0.05 and not math.isnan(lead.p_value)
    assert over_runs_interval_is_absent([0.8, 0.8, 0.8])


def over_runs_interval_is_absent(values) -> bool:
    est = statistics.over_runs(values)
    return est.std == 0 and est.low is None and est.high is None and "no spread" in est.method


def test_t_interval_over_runs():
    est = statistics.over_runs([1, 2, 3, 4, 5])
    # mean 3, sem sqrt(2.5 / 5), t(0.975, 4) = 2.776445
    assert est.mean == 3 and est.std == pytest.approx(math.sqrt(2.5))
    assert (est.low, est.high) == pytest.approx((3 - 2.776445 * math.sqrt(0.5), 3 + 2.776445 * math.sqrt(0.5)), abs=1e-5)
    one = statistics.over_runs([0.7])
    assert (one.mean, one.std, one.low, one.n) == (0.7, None, None, 1)


def test_wilson_interval():
    est = statistics.wilson(8, 10)  # the Wilson 95% interval of 8/10 is 0.490 to 0.943
    assert est.mean == 0.8 and (round(est.low, 3), round(est.high, 3)) == (0.49, 0.943)
    low, high = proportion_confint(37, 160, alpha=0.05, method="wilson")
    assert (statistics.wilson(37, 160).low, statistics.wilson(37, 160).high) == pytest.approx((low, high))


# --- folds ----------------------------------------------------------------------------------------

def test_corrected_resampled_t_test():
    rng = np.random.default_rng(3)
    sizes = [32, 32, 31, 31, 30]
    pool = sum(sizes)
    a = [rng.random(k) < 0.8 for k in sizes]
    b = [rng.random(k) < 0.7 for k in sizes]
    result = statistics.over_folds(a, b, pool)
    d = np.array([x.mean() - y.mean() for x, y in zip(a, b)])
    # Nadeau & Bengio (2003): var = (1/K + n_test/n_train) s^2, t with K - 1 df.
    ratio = np.mean([k / (pool - k) for k in sizes])
    t_value = d.mean() / math.sqrt((1 / 5 + ratio) * d.var(ddof=1))
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t_value), 4))
    plain = stats.ttest_rel([x.mean() for x in a], [y.mean() for y in b]).pvalue
    assert result.p_value > plain  # the correction is more cautious than the plain t-test
    assert result.difference == pytest.approx(100 * d.mean()) and result.covers == statistics.IMAGES_AND_FOLDS
    assert (result.low > 0 or result.high < 0) == (result.p_value < 0.05)
    # Equal differences in every fold: no zero-width interval, the pooled exact test instead.
    same = [np.array([True] * 9 + [False]) for _ in range(3)]
    other = [np.array([True] * 8 + [False] * 2) for _ in range(3)]
    fallback = statistics.over_folds(same, other, 30)
    assert fallback.test == "McNemar exact test" and fallback.low < fallback.high and fallback.note


# --- multiplicity and wording -------------------------------------------------------------------------

def test_holm_against_a_hand_computed_example_and_statsmodels():
    # Sorted 0.01, 0.03, 0.04 of 3: 0.03, max(0.06, 0.03) = 0.06, max(0.04, 0.06) = 0.06.
    assert statistics.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert statistics.holm([0.02, 0.9]) == pytest.approx([0.04, 0.9])  # 2 * 0.02; then max(0.9, 0.04)
    assert statistics.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, then monotone
    rng = np.random.default_rng(4)
    for _ in range(50):
        p = rng.random(int(rng.integers(1, 7))) ** 3
        assert statistics.holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())


def test_sentences_say_what_they_cover_and_follow_the_adjusted_p():
    strong = statistics.over_images(*one_run(100, 30, 5, 25))
    text = statistics.sentence("ResNet-34", "Plain-34", strong, 0.004, 3)
    assert text.startswith(f"ResNet-34 beats Plain-34 by {strong.difference:.1f} points (95% CI ")
    assert "Holm-adjusted over 3 pairs 0.004" in text and "not training randomness" in text
    # Raw p below 0.05, adjusted above: no claim, and the sentence says why.
    edge = statistics.over_images(*one_run(100, 12, 3, 45))
    assert edge.p_value < 0.05
    text = statistics.sentence("A", "B", edge, 0.09, 3)
    assert "beats" not in text and "correcting for 3 comparisons" in text
    two_level = statistics.over_runs_and_images(np.ones((3, 40), bool) & (np.arange(40) < 35),
                                                np.ones((3, 40), bool) & (np.arange(40) < 20))
    text = statistics.sentence("A", "B", two_level)
    assert "both the sampling of images and training randomness" in text and "fresh training run" in text


def test_p_and_bounds_never_round_across_the_line():
    assert statistics.format_p(0.04996) == "p = 0.04996" and statistics.format_p(0.0500001) == "p = 0.050"
    assert statistics.format_p(0.0004) == "p < 0.001" and statistics.format_p(0.2345, prefix="") == "0.234"
    assert statistics.format_points(0.02) == "0.02" and statistics.format_points(-0.004) == "-0.004"
    assert statistics.format_points(3.14159) == "3.1" and statistics.format_points(0.0) == "0.0"
    assert statistics.format_chance(0.999) == "> 0.99" and statistics.format_chance(0.5) == "0.50"


def test_several_runs_decide_by_the_more_cautious_of_the_crossed_t_and_the_exact_test():
    rng = np.random.default_rng(5)
    cautious_exact = 0
    for _ in range(200):
        runs, n = 3, int(rng.integers(20, 120))
        base = rng.random(n) < 0.7
        a = np.stack([base ^ (rng.random(n) < rng.uniform(0, 0.08)) for _ in range(runs)])
        b = np.stack([base ^ (rng.random(n) < rng.uniform(0, 0.08)) for _ in range(runs)])
        crossed, images = statistics.over_runs_and_images(a, b), statistics.over_images(a, b)
        result = statistics.over_runs_and_images_and_exact(a, b)
        assert result.p_value == pytest.approx(max(crossed.p_value, images.p_value))
        assert result.low <= min(crossed.low, images.low) + 1e-9 and result.high >= max(crossed.high, images.high) - 1e-9
        assert (result.low > 0 or result.high < 0) == (result.p_value < statistics.ALPHA)
        cautious_exact += images.p_value > crossed.p_value
    assert cautious_exact > 0  # the case this guards against happens with few discordant images


def test_over_runs_gives_no_interval_from_two_runs_and_stays_in_the_metric_range():
    two = statistics.over_runs([0.6, 0.9], (0, 1))
    assert two.std == pytest.approx(np.std([0.6, 0.9], ddof=1)) and two.low is None and two.high is None
    values = [0.99, 1.0, 0.90]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert high > 1
    clipped = statistics.over_runs(values, (0, 1))
    assert (clipped.low, clipped.high) == pytest.approx((low, 1.0))

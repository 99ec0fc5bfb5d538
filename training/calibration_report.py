"""The comparison's calibration section: can each model's probabilities be taken at their word,
and does it say "unsure" when it should?

Computed from the files each run wrote: ``logits.csv`` (raw logits of the validation and test
images), ``ood.csv`` (those of the out-of-distribution images, where there are some) and
``report.json`` (the temperature and threshold fitted on validation). ``write`` returns the
markdown section and the record for ``comparison.json``, and draws ``calibration.png``
(reliability diagrams before and after temperature scaling, and risk-coverage curves).
With several runs per model the section describes the first one (``study[0]``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import stats

from common import calibration as cal
from common.run_layout import Member, ModelFiles, RunLayout
from training.reports import plt, read_logits, save_figure

TITLES = {"val": "validation", "test": "test"}
METRICS = (("ece", cal.ece, "confidence"), ("nll", np.mean, "nll"), ("brier", np.mean, "brier"))


def _per_image(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    p = cal.softmax(logits, temperature)
    return {"confidence": cal.top_confidence(p), "correct": cal.correctness(p, labels),
            "nll": cal.per_image_nll(p, labels), "brier": cal.per_image_brier(p, labels)}


def _metrics(per_image: dict) -> dict:
    out = {}
    for key, statistic, column in METRICS:
        arrays = (per_image["confidence"], per_image["correct"]) if key == "ece" else (per_image[column],)
        out[key] = cal.bootstrap(statistic, *arrays).as_dict()
    return out


def summarize_model(files: ModelFiles, splits: list[str]) -> dict | None:
    """One model's calibration record, or None for a run without logits or a fitted temperature."""
    report = json.loads(files.report.read_text())
    fitted = report.get("calibration")
    if not fitted or not files.logits.is_file():
        return None
    classes, temperature = report["class_names"], fitted["temperature"]
    logits = read_logits(files.logits, classes)
    # The threshold as the export chooses it (from the same validation images, by the same rule).
    val = _per_image(logits["val"]["logits"], logits["val"]["labels"], temperature)
    abstain = cal.abstention_threshold(val["confidence"], val["correct"], fitted["abstain"]["target_accuracy"])
    threshold = abstain.threshold
    out = {"display_name": report["display_name"], "temperature": temperature,
           "abstain": abstain.as_dict(), "splits": {}}
    for split in splits:
        z, y = logits[split]["logits"], logits[split]["labels"]
        before, after = _per_image(z, y, 1.0), _per_image(z, y, temperature)
        out["splits"][split] = {
            "images": len(y), "accuracy": float(after["correct"].mean()),
            "before": {**_metrics(before), "reliability": cal.reliability_bins(before["confidence"], before["correct"])},
            "after": {**_metrics(after), "reliability": cal.reliability_bins(after["confidence"], after["correct"])},
            "ece_if_calibrated": cal.ece_if_calibrated(after["confidence"]),
            "mean_confidence_before": float(before["confidence"].mean()),
            "mean_confidence_after": float(after["confidence"].mean()),
            "kept_at_threshold": cal.selective(after["confidence"], after["correct"], threshold),
        }
        coverage, accuracy = cal.risk_coverage(after["confidence"], after["correct"])
        out["splits"][split]["risk_coverage"] = {"coverage": coverage.tolist(), "accuracy": accuracy.tolist()}
    reference = splits[-1]  # the test split where there is one: never fitted on
    if files.ood_logits.is_file():
        ood = cal.top_confidence(cal.softmax(read_logits(files.ood_logits, classes)["ood"]["logits"], temperature))
        inside = cal.top_confidence(cal.softmax(logits[reference]["logits"], temperature))
        out["ood"] = {"images": len(ood), "in_distribution_split": reference,
                      "unsure_share": float((ood < threshold).mean()),
                      "mean_confidence": float(ood.mean()), "auroc": _auroc_interval(inside, ood)}
    return out


def _auroc_interval(inside: np.ndarray, ood: np.ndarray) -> dict:
    """AUROC with a percentile bootstrap interval, the two sets resampled independently."""
    value = cal.auroc(inside, ood)
    if len(inside) < 2 or len(ood) < 2:
        return {"value": value, "low": None, "high": None, "n": len(inside) + len(ood)}
    result = stats.bootstrap((inside, ood), cal.auroc, paired=False, vectorized=False,
                             n_resamples=cal.BOOTSTRAP_RESAMPLES, method="percentile",
                             confidence_level=cal.CONFIDENCE_LEVEL, random_state=np.random.default_rng(0))
    return {"value": value, "low": float(result.confidence_interval.low),
            "high": float(result.confidence_interval.high), "n": len(inside) + len(ood)}


def _ci(estimate: dict, digits: int = 3) -> str:
    text = f"{estimate['value']:.{digits}f}"
    if estimate["low"] is not None:
        text += f" ({estimate['low']:.{digits}f}–{estimate['high']:.{digits}f})"
    return text


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def render(record: dict, splits: list[str], member: Member) -> str:
    models = record["models"]
    which = "" if member.label is None else f" Figures of the {member.label} run of each model."
    lines = [
        "", "## Calibration", "",
        "Are the probabilities right as probabilities? Expected calibration error (ECE) over the top-1 "
        f"probability in {cal.BINS} equal-width bins (Guo et al. 2017), negative log-likelihood (NLL) and "
        "Brier score, with 95% percentile bootstrap intervals over images "
        f"({cal.BOOTSTRAP_RESAMPLES} resamples). *Before*: softmax of the raw logits; *after*: "
        "softmax(logits / T), one temperature T per model fitted on the validation split by minimising "
        "NLL (the test split was never used to fit anything); the exported files compute *after*."
        + which + " On few images the binned ECE is biased upwards: *ECE if calibrated* is the mean (and "
        "95th percentile) ECE of a perfectly calibrated model with the calibrated confidences on as many "
        "images (each right with probability equal to its confidence; consistency resampling), so an ECE "
        "after within it is as good as these images can show. The same bias shifts the bootstrap "
        "resamples upwards, so an ECE interval can sit above its own estimate: compare ECEs with the "
        "*ECE if calibrated* column, not with each other's intervals.",
        "", "![Reliability diagrams and risk-coverage curves](calibration.png)", "",
    ]
    for split in splits:
        lines += [f"### {TITLES[split].capitalize()}", "",
                  "| model | T | accuracy | mean confidence before → after | ECE before | ECE after | "
                  "ECE if calibrated | NLL before | NLL after | Brier before | Brier after |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in models.values():
            s = m["splits"][split]
            lines.append(f"| {m['display_name']} | {m['temperature']:.3f} | {s['accuracy']:.3f} | "
                         f"{s['mean_confidence_before']:.3f} → {s['mean_confidence_after']:.3f} | "
                         + " | ".join([_ci(s["before"]["ece"]), _ci(s["after"]["ece"]),
                                       f"{s['ece_if_calibrated']['mean']:.3f} (≤ {s['ece_if_calibrated']['p95']:.3f})",
                                       *(_ci(s[when][key]) for key in ("nll", "brier") for when in ("before", "after"))])
                         + " |")
        lines.append("")
    target = next(iter(models.values()))["abstain"]["target_accuracy"]
    reference = splits[-1]
    lines += [
        "### Unsure: abstaining on the least confident images", "",
        f"Each model is *unsure* when its calibrated top probability is below a threshold chosen on "
        f"validation as the lowest at which the predictions it keeps are at least {target:.0%} right "
        "(selective classification, Geifman and El-Yaniv 2017). Coverage: the share of images kept.",
    ]
    has_ood = all("ood" in m for m in models.values())
    if has_ood:
        first = next(iter(models.values()))["ood"]
        lines += ["", f"Out of distribution: {first['images']} held-out images of none of the classes, never "
                  "trained or fitted on. *Unsure on them*: the share a model abstains on (higher is better); "
                  f"AUROC: how well its calibrated confidence tells the {TITLES[reference]} images from them "
                  "(1 perfect, 0.5 chance), with a bootstrap interval."]
    shown = list(dict.fromkeys(("val", reference)))
    lines += ["", "| model | threshold | " + " | ".join(f"{TITLES[s]}: coverage, accuracy kept" for s in shown)
              + " |" + (" unsure on out-of-distribution | AUROC |" if has_ood else ""),
              "|---|---:|" + "---:|" * len(shown) + ("---:|---:|" if has_ood else "")]
    for m in models.values():
        kept = [m["splits"][s]["kept_at_threshold"] for s in shown]
        cells = [f"{_pct(k['coverage'])}, " + ("–" if k["accuracy"] is None else f"{k['accuracy']:.1%}") for k in kept]
        row = f"| {m['display_name']} | {m['abstain']['threshold']:.3f} | " + " | ".join(cells) + " |"
        if has_ood:
            row += f" {m['ood']['unsure_share']:.0%} | {_ci(m['ood']['auroc'])} |"
        lines.append(row)
    lines += ["", "In short:", ""] + [f"- {sentence(m, reference)}" for m in models.values()]
    return "\n".join(lines) + "\n"


def sentence(m: dict, split: str) -> str:
    s = m["splits"][split]
    before, after = s["before"]["ece"]["value"], s["after"]["ece"]["value"]
    floor = s["ece_if_calibrated"]
    gap = s["mean_confidence_before"] - s["accuracy"]
    lean = "overconfident" if gap > 0.02 else "underconfident" if gap < -0.02 else "about as confident as right"
    verdict = ("as calibrated as these images can show" if after <= floor["p95"] else
               "still above what a calibrated model shows on them")
    text = (f"{m['display_name']}: raw probabilities {lean} on {TITLES[split]} (mean confidence "
            f"{s['mean_confidence_before']:.2f} at accuracy {s['accuracy']:.2f}); T = {m['temperature']:.2f} "
            f"takes ECE from {before:.3f} to {after:.3f}, {verdict} (a calibrated model would show "
            f"{floor['mean']:.3f}, at most {floor['p95']:.3f} in 95% of draws, on these {s['images']} "
            f"images), NLL from {s['before']['nll']['value']:.3f} to {s['after']['nll']['value']:.3f}.")
    if "ood" in m:
        o, auroc = m["ood"], m["ood"]["auroc"]
        inside = TITLES[o["in_distribution_split"]]
        if auroc["low"] is None:
            tells = ""
        elif auroc["low"] > 0.5:
            tells = f", better than chance at telling them from the {inside} images"
        elif auroc["high"] < 0.5:
            tells = f": it is more confident on them than on the {inside} images"
        else:
            tells = f": its confidence is no better than chance at telling them from the {inside} images"
        unsure_inside = 1 - m["splits"][o["in_distribution_split"]]["kept_at_threshold"]["coverage"]
        text += (f" Unsure on {o['unsure_share']:.0%} of the out-of-distribution images and on "
                 f"{unsure_inside:.0%} of the {inside} images (AUROC {_ci(auroc, 2)}{tells}).")
    return text


def plot(path: Path, record: dict, split: str) -> None:
    """Per model a reliability diagram (before, after) on ``split``; then every model's
    risk-coverage curve on it."""
    models = record["models"]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(4 * (len(models) + 1), 4))
    target = None
    for ax, m in zip(axes, models.values()):
        s = m["splits"][split]
        for when, style, label in (("before", "o--", "before (T = 1)"), ("after", "s-", f"after (T = {m['temperature']:.2f})")):
            bins = [b for b in s[when]["reliability"] if b["count"]]
            x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
            color = "grey" if when == "before" else "C0"
            ax.plot(x, y, style[1:], color=color, label=f"{label}, ECE {s[when]['ece']['value']:.3f}")
            # Marker area by the bin's share of the images: a bin of one image is right or wrong, 0 or 1.
            ax.scatter(x, y, s=[4 + 400 * b["count"] / s["images"] for b in bins], marker=style[0],
                       color=color, zorder=3)
        ax.plot([0, 1], [0, 1], ":", color="black", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (mean of bin)", ylabel="accuracy",
               title=f"{m['display_name']} ({TITLES[split]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", title="marker area: the bin's share of images",
                  title_fontsize=7)
        target = m["abstain"]["target_accuracy"]
    ax = axes[-1]
    for i, m in enumerate(models.values()):
        curve = m["splits"][split]["risk_coverage"]
        ax.plot(curve["coverage"], curve["accuracy"], "-", color=f"C{i}", label=m["display_name"])
        kept = m["splits"][split]["kept_at_threshold"]
        if kept["accuracy"] is not None:
            ax.plot([kept["coverage"]], [kept["accuracy"]], "o", color=f"C{i}")
    if target is not None:
        ax.axhline(target, linestyle=":", color="black", linewidth=1, label=f"target {target:.0%}")
    ax.set(xlim=(0, 1.02), xlabel="coverage (share of images kept)", ylabel="accuracy of the kept",
           title=f"Risk-coverage ({TITLES[split]}; dots: the thresholds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def write(run_dir: Path, models: list[str], study: list[Member], splits: list[str],
          out_dir: Path | None = None) -> tuple[str, dict]:
    """(markdown section, record for comparison.json); ("", {}) for runs made before calibration.
    calibration.png goes to ``out_dir`` (default: the run folder)."""
    member, layout = study[0], RunLayout(run_dir)
    summaries = {name: summarize_model(layout.member_files(name, member), splits) for name in models}
    if any(v is None for v in summaries.values()):
        return "", {}
    record = {"bins": cal.BINS, "bootstrap_resamples": cal.BOOTSTRAP_RESAMPLES, "run": member.label,
              "models": summaries}
    plot(RunLayout(out_dir or run_dir).calibration_png, record, splits[-1])
    return render(record, splits, member), record

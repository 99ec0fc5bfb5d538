"""The study's comparison: what the data supports about the models, on one page.

Everything is computed from the files each run wrote (``report.json``, ``predictions.csv``,
``history.csv``), so anyone can recompute it. Writes ``comparison.md``, ``comparison.json``,
``comparison.png`` (validation curves of every model, mean and range over runs) and, per model,
``errors.png`` (the validation images it got wrong).
"""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

import imaging
from common.files import write_json, write_text
from training import calibration_report, statistics
from training.config import TrainConfig
from training.reports import plt, read_predictions, save_figure
from training.study import Member

METRICS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("loss", "loss"))
ERROR_GRID_LIMIT = 40  # images shown per errors.png


def _load(run_dir: Path, models: list[str], study: list[Member]) -> dict:
    """{model: [{"report", "predictions", "history"} per member]}."""
    out = {}
    for name in models:
        out[name] = []
        for member in study:
            folder = member.folder(run_dir, name)
            with open(folder / "history.csv", newline="") as f:
                history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
            out[name].append({"report": json.loads((folder / "report.json").read_text()),
                              "predictions": read_predictions(folder / "predictions.csv"),
                              "history": history})
    return out


def _correct_by_image(runs: list[dict], split: str, pooled: bool) -> dict[str, bool]:
    """Per image path, whether the model got it right: every image once (a single run, the
    first seed, or the folds pooled: each fold validates different images, but every fold
    tests the same ones, so the test split always comes from the first run)."""
    chosen = runs if pooled and split == "val" else runs[:1]
    return {row["path"]: row["label"] == row["predicted"]
            for run in chosen for row in run["predictions"] if row["split"] == split}


def summarize(data: dict, splits: list[str], pooled: bool) -> dict:
    """Per model and split: each metric's estimate; per split: every pair's paired test."""
    models = list(data)
    per_model = {}
    for name, runs in data.items():
        per_model[name] = {"display_name": runs[0]["report"]["display_name"], "runs": len(runs)}
        for split in splits:
            estimates = {key: statistics.over_runs([r["report"][f"{split}_{key}"] for r in runs]).as_dict()
                         for key, _ in METRICS}
            if len(runs) == 1 or pooled:  # accuracy over every image once, with a Wilson interval
                correct = _correct_by_image(runs, split, pooled)
                estimates["accuracy_over_images"] = statistics.wilson(sum(correct.values()), len(correct)).as_dict()
            per_model[name][split] = estimates
    pairs = {split: [] for split in splits}
    def paired(a: str, b: str, split: str):
        runs_a = [r["report"][f"{split}_accuracy"] for r in data[a]]
        runs_b = [r["report"][f"{split}_accuracy"] for r in data[b]]
        correct_a = _correct_by_image(data[a], split, pooled)
        correct_b = _correct_by_image(data[b], split, pooled)
        paths = sorted(correct_a.keys() & correct_b.keys())
        mcnemar = statistics.mcnemar([correct_a[p] for p in paths], [correct_b[p] for p in paths])
        t_test = statistics.paired_t(runs_a, runs_b) if len(runs_a) >= statistics.MIN_RUNS_FOR_T_TEST else None
        # Over runs when there are enough of them (it sees the seed-to-seed spread), else per
        # image; the difference reported is the primary test's own.
        return t_test or mcnemar, mcnemar, t_test

    for split in splits:
        for a, b in itertools.combinations(models, 2):
            primary, mcnemar, t_test = paired(a, b, split)
            if primary.difference < 0:  # the better model first
                a, b = b, a
                primary, mcnemar, t_test = paired(a, b, split)
            display_a, display_b = per_model[a]["display_name"], per_model[b]["display_name"]
            pairs[split].append({
                "models": [a, b], "difference_points": primary.difference,
                "primary": primary.as_dict(), "mcnemar": mcnemar.as_dict(),
                "t_test": t_test.as_dict() if t_test else None,
                "sentence": statistics.sentence(display_a, display_b, primary),
            })
    return {"models": per_model, "pairs": pairs}


def _cell(estimate: dict, digits: int = 4) -> str:
    text = f"{estimate['mean']:.{digits}f}"
    if estimate["std"] is not None:
        text += f" ± {estimate['std']:.{digits}f}"
    if estimate["low"] is not None:
        text += f" ({estimate['low']:.{digits}f}–{estimate['high']:.{digits}f})"
    return text


def render(summary: dict, data: dict, config: TrainConfig, study: list[Member], run_info: dict,
           splits: list[str]) -> str:
    runs = len(study)
    how = ("one run per model" if runs == 1 else
           f"{runs} folds per model (stratified cross-validation, seed {config.seed})" if config.folds else
           f"{runs} runs per model (seeds {study[0].seed} to {study[-1].seed}, one split)")
    lines = [
        f"# Comparison: {run_info['dataset']}", "",
        f"{run_info['classes']} classes; {run_info['split_sizes']}; image size {run_info['image_size']} px; "
        f"device {run_info['device']}; {how}. Metrics at each model's best epoch (lowest validation loss).",
    ]
    for split in splits:
        title = {"val": "Validation", "test": "Test"}[split]
        lines += ["", f"## {title}", ""]
        if runs == 1:
            lines += ["Accuracy with its 95% Wilson interval over the images.", "",
                      "| model | accuracy (95% CI) | macro-F1 | loss |", "|---|---:|---:|---:|"]
            for name, model in summary["models"].items():
                est = model[split]
                lines.append(f"| {model['display_name']} | {_cell(est['accuracy_over_images'])} | "
                             f"{est['macro_f1']['mean']:.4f} | {est['loss']['mean']:.4f} |")
        else:
            lines += [f"Mean ± standard deviation over {runs} runs, with the 95% t interval of the mean.", "",
                      "| model | accuracy | macro-F1 | loss |", "|---|---:|---:|---:|"]
            for name, model in summary["models"].items():
                est = model[split]
                lines.append(f"| {model['display_name']} | {_cell(est['accuracy'])} | "
                             f"{_cell(est['macro_f1'])} | {_cell(est['loss'])} |")
        if summary["pairs"][split]:
            lines += ["", "What the data supports:", ""]
            lines += [f"- {pair['sentence']}" for pair in summary["pairs"][split]]
            counted = ("the one run" if runs == 1 else f"seed {study[0].seed}'s runs" if not config.folds
                       else "the folds pooled" if split == "val" else "fold 1's runs: every fold tests the same images")
            lines += ["", "| pair | difference (points) | 95% CI | p | test | McNemar: only A right / only B right (p) |",
                      "|---|---:|---:|---:|---|---:|"]
            for pair in summary["pairs"][split]:
                a, b = (summary["models"][m]["display_name"] for m in pair["models"])
                primary, mc = pair["primary"], pair["mcnemar"]
                lines.append(f"| {a} vs {b} | {primary['difference']:+.1f} | {primary['low']:.1f} to "
                             f"{primary['high']:.1f} | {statistics.format_p(primary['p_value'], prefix='')} | "
                             f"{primary['test']} | {mc['a_only']} / {mc['b_only']} "
                             f"({statistics.format_p(mc['p_value'])}) |")
            lines += ["", f"McNemar's test counts each {split} image once ({counted}); "
                      + ("the t-test compares the runs' accuracies pairwise." if runs >= statistics.MIN_RUNS_FOR_T_TEST
                         else "a paired t-test needs at least 3 runs (--seeds 3 or --folds 5).")]
    lines += ["", "## Training", "",
              "| model | train acc | train loss | best epoch | epochs run | parameters | mult-adds | time |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, model_runs in data.items():
        reports = [r["report"] for r in model_runs]
        mean = lambda key: np.mean([r[key] for r in reports])  # noqa: E731
        best = "/".join(str(r["best_epoch"]) for r in reports)
        ran = "/".join(str(r["epochs_run"]) for r in reports)
        lines.append(f"| {reports[0]['display_name']} | {mean('train_accuracy'):.4f} | {mean('train_loss'):.4f} | "
                     f"{best} | {ran} | {reports[0]['parameters']:,} | {reports[0]['mult_adds'] / 1e9:.2f} G | "
                     f"{sum(r['seconds'] for r in reports):.0f} s |")
    names = list(data)
    lines += ["", "Per-class F1 on the validation split" + (" (mean over runs)" if runs > 1 else "") + ":", "",
              "| class | " + " | ".join(summary["models"][n]["display_name"] for n in names) + " |",
              "|---|" + "---:|" * len(names)]
    for cls in data[names[0]][0]["report"]["per_class"]:
        f1 = [np.mean([r["report"]["per_class"][cls]["f1"] for r in data[n]]) for n in names]
        lines.append(f"| {cls} | " + " | ".join(f"{v:.3f}" for v in f1) + " |")
    lines += ["", "![Validation curves of every model](comparison.png)", "",
              "Every number here is recomputed from the runs' `predictions.csv` and `report.json` "
              "(`comparison.json` holds them as data).", ""]
    return "\n".join(lines)


def plot_curves(path: Path, data: dict) -> None:
    """Validation accuracy and loss per epoch of every model: the mean over runs, and a band
    from the lowest to the highest run (runs that stopped early count while they ran)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in data.items():
        display = runs[0]["report"]["display_name"]
        epochs = sorted({int(row["epoch"]) for r in runs for row in r["history"]})
        for ax, metric in zip(axes, ("val_accuracy", "val_loss")):
            values = [[row[metric] for r in runs for row in r["history"] if int(row["epoch"]) == e]
                      for e in epochs]
            (line,) = ax.plot(epochs, [np.mean(v) for v in values], "o-", label=display)
            if len(runs) > 1:
                ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                                color=line.get_color(), alpha=0.2)
    for ax, label in zip(axes, ("validation accuracy", "validation loss")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    runs = len(next(iter(data.values())))
    fig.suptitle("Validation curves" + (f" (mean and range over {runs} runs)" if runs > 1 else ""))
    fig.tight_layout()
    save_figure(fig, path)


def plot_errors(path: Path, display: str, wrong: list[dict], everyone_wrong: set[str]) -> None:
    """A grid of misclassified validation images, true and predicted class under each; those
    every model got wrong framed in red."""
    shown = wrong[:ERROR_GRID_LIMIT]
    columns = 8
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown):
        try:
            image = imaging.load_rgb(row["path"])
            image.thumbnail((96, 96))
            ax.imshow(np.asarray(image))
        except (imaging.ImageError, OSError):
            ax.text(0.5, 0.5, "(file gone)", ha="center", va="center")
        common = row["path"] in everyone_wrong
        ax.set_title(f"{row['label']}\n→ {row['predicted']}" + ("\n(all models)" if common else ""),
                     fontsize=7, color="red" if common else "black")
        if common:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
    more = f", {len(shown)} shown" if len(wrong) > len(shown) else ""
    fig.suptitle(f"{display}: {len(wrong)} validation image(s) wrong{more}; red: every model got it wrong"
                 if wrong else f"{display}: no validation image wrong", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def write_comparison(run_dir: Path, config: TrainConfig, study: list[Member], run_info: dict) -> dict:
    data = _load(Path(run_dir), list(config.models), study)
    first = data[config.models[0]][0]["report"]
    splits = ["val"] + (["test"] if first.get("test_accuracy") is not None else [])
    pooled = bool(config.folds)
    summary = summarize(data, splits, pooled)
    calibration_md, calibration = calibration_report.write(Path(run_dir), list(config.models), study, splits)
    write_json(run_dir / "comparison.json", {"runs": [m.label for m in study], "pooled_folds": pooled,
                                             **run_info, **summary, "calibration": calibration})
    write_text(run_dir / "comparison.md", render(summary, data, config, study, run_info, splits) + calibration_md)
    plot_curves(run_dir / "comparison.png", data)
    chosen = {name: [row for run in (runs if pooled else runs[:1]) for row in run["predictions"]
                     if row["split"] == "val"] for name, runs in data.items()}
    wrong = {name: [row for row in rows if row["label"] != row["predicted"]] for name, rows in chosen.items()}
    everyone_wrong = set.intersection(*({row["path"] for row in rows} for rows in wrong.values()))
    for name, rows in wrong.items():
        plot_errors(run_dir / name / "errors.png", data[name][0]["report"]["display_name"], rows,
                    everyone_wrong if len(wrong) > 1 else set())
    return summary

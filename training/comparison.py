"""The study's comparison: what the data supports about the models, on one page.

Everything is computed from the files each run wrote (``report.json``, ``predictions.csv``,
``history.csv``), so anyone can recompute it (``python -m training.compare``). Writes
``comparison.md``, ``comparison.json``, ``comparison.png`` (validation curves of every model,
mean and range over runs) and, per model, ``errors.png`` (the validation images it got wrong).

The claims ("What the data supports") are made on the test split when there is one: the
validation split chose each run's best epoch (and stopped it early), so its figures are
optimistic for the model it chose; they stay in the report, labelled so.
"""
from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.ticker import MaxNLocator

import imaging
from common import statistics
from common.files import write_json, write_text
from common.run_layout import Member, ModelFiles, RunLayout
from training import calibration_report
from training.config import TrainConfig
from training.reports import plt, read_predictions, save_figure

METRICS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("loss", "loss"))
BOUNDS = {"accuracy": (0.0, 1.0), "macro_f1": (0.0, 1.0), "loss": (0.0, float("inf"))}
ERROR_GRID_LIMIT = 40  # images shown per errors.png
CLAIMS_TITLE = "What the data supports"
SPLIT_TITLES = {"test": "Test", "val": "Validation (the split that chose each run's epoch)"}


@dataclass(frozen=True)
class Source:
    """One training run of every model: the run folder it is in and its member there."""

    run_dir: Path
    member: Member

    @property
    def label(self) -> str:
        return self.member.label or Member.of_seed(self.member.seed).label

    def files(self, model: str) -> ModelFiles:
        return RunLayout(self.run_dir).member_files(model, self.member)


@dataclass
class Context:
    """What the sections are built from: the loaded runs and how they were made."""

    data: dict  # {model: [{"report", "predictions", "history"} per run]}
    splits: list[str]  # "val", and "test" when there is one
    sources: list[Source]
    folds: int  # K of --folds, else 0
    pool: int | None  # with folds: the images the folds were cut from
    run_info: dict
    out_dir: Path  # where comparison.md and its pictures go
    summary: dict = field(default_factory=dict)


@dataclass
class Section:
    """Markdown lines for comparison.md and the data comparison.json keeps under ``key``."""

    key: str
    lines: list[str]
    data: dict | list | None = None


# Further sections (e.g. calibration) are functions of the Context that return a Section or
# None; they are placed after the per-split sections and their data lands in comparison.json
# under "sections".
def calibration_section(ctx: Context) -> Section | None:
    """Calibration, "unsure" and the out-of-distribution check (training/calibration_report.py),
    of the first run; None for runs trained before calibration."""
    first = ctx.sources[0]
    markdown, record = calibration_report.write(first.run_dir, list(ctx.data), [first.member], ctx.splits,
                                                ctx.out_dir)
    return Section("calibration", markdown.splitlines(), record) if record else None


EXTRA_SECTIONS: list[Callable[[Context], Section | None]] = [calibration_section]


def load(sources: list[Source], models: list[str]) -> dict:
    """{model: [{"report", "predictions", "history"} per source]}."""
    out = {}
    for name in models:
        out[name] = []
        for source in sources:
            files = source.files(name)
            with open(files.history, newline="") as f:
                history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
            out[name].append({"report": json.loads(files.report.read_text()),
                              "predictions": read_predictions(files.predictions),
                              "history": history})
    return out


def _correct(run: dict, split: str) -> dict[str, bool]:
    return {row["path"]: row["label"] == row["predicted"] for row in run["predictions"] if row["split"] == split}


def _pair(data: dict, a: str, b: str, split: str, folded: bool, pool: int | None):
    """(the deciding test, the exact test over images) for A minus B on one split."""
    runs_a, runs_b = [_correct(r, split) for r in data[a]], [_correct(r, split) for r in data[b]]
    if folded:  # each fold validates its own images: per fold, then pooled (each image once)
        per_fold = [(np.array([ra[p] for p in sorted(ra)]), np.array([rb[p] for p in sorted(ra)]))
                    for ra, rb in zip(runs_a, runs_b)]
        fa, fb = [x for x, _ in per_fold], [y for _, y in per_fold]
        images = statistics.over_images(np.concatenate(fa), np.concatenate(fb))
        return statistics.over_folds(fa, fb, pool), images
    paths = sorted(set.intersection(*(set(r) for r in runs_a + runs_b)))
    matrix_a = np.array([[r[p] for p in paths] for r in runs_a])
    matrix_b = np.array([[r[p] for p in paths] for r in runs_b])
    images = statistics.over_images(matrix_a, matrix_b)
    if len(runs_a) >= statistics.MIN_RUNS:
        return statistics.over_runs_and_images_and_exact(matrix_a, matrix_b), images
    return images, images


def summarize(data: dict, splits: list[str], folds: int = 0, pool: int | None = None) -> dict:
    """Per model and split: each metric's estimate; per split: every pair's tests, Holm-adjusted
    over the split's pairs, and one sentence each (the model ahead first, by the deciding test,
    whose difference is the difference of the table's means)."""
    models = list(data)
    per_model = {}
    for name, runs in data.items():
        per_model[name] = {"display_name": runs[0]["report"]["display_name"], "runs": len(runs)}
        for split in splits:
            estimates = {key: statistics.over_runs([r["report"][f"{split}_{key}"] for r in runs], BOUNDS[key]).as_dict()
                         for key, _ in METRICS}
            pooled = folds and split == "val"
            if len(runs) == 1 or pooled:  # accuracy over every image once, with a Wilson interval
                correct = [v for r in (runs if pooled else runs[:1]) for v in _correct(r, split).values()]
                estimates["accuracy_over_images"] = statistics.wilson(sum(correct), len(correct)).as_dict()
            per_model[name][split] = estimates
    pairs = {}
    for split in splits:
        folded = bool(folds) and split == "val"
        found = []
        for a, b in itertools.combinations(models, 2):
            primary, images = _pair(data, a, b, split, folded, pool)
            if primary.difference < 0:  # the model ahead first
                a, b = b, a
                primary, images = _pair(data, a, b, split, folded, pool)
            found.append((a, b, primary, images))
        adjusted = statistics.holm([primary.p_value for _, _, primary, _ in found])
        pairs[split] = []
        for (a, b, primary, images), p_holm in zip(found, adjusted):
            display_a, display_b = per_model[a]["display_name"], per_model[b]["display_name"]
            pairs[split].append({
                "models": [a, b], "difference_points": primary.difference, "p_holm": p_holm,
                "primary": primary.as_dict(), "over_images": images.as_dict(),
                "sentence": statistics.sentence(display_a, display_b, primary, p_holm, len(found)),
            })
    claims = "test" if "test" in splits else "val"
    return {"claims_split": claims, "models": per_model, "pairs": pairs}


def _cell(estimate: dict, digits: int = 4) -> str:
    text = f"{estimate['mean']:.{digits}f}"
    if estimate["std"] is not None:
        text += f" ± {estimate['std']:.{digits}f}"
    if estimate["low"] is not None:
        text += f" ({estimate['low']:.{digits}f}–{estimate['high']:.{digits}f})"
    elif estimate["std"] is not None:
        text += " (no spread)" if estimate["std"] == 0 else " (too few runs for an interval)"
    return text


def _accuracy_cell(model: dict, split: str) -> str:
    est = model[split]
    return _cell(est["accuracy_over_images"] if model["runs"] == 1 else est["accuracy"])


def _how(ctx: Context) -> str:
    runs = len(ctx.sources)
    if runs == 1:
        return "one run per model"
    if ctx.folds:
        return f"{runs} folds per model (stratified cross-validation, seed {ctx.sources[0].member.seed})"
    seeds = ", ".join(str(s.member.seed) for s in ctx.sources)
    return f"{runs} runs per model (seeds {seeds}, one split)"


def _split_size(ctx: Context, split: str) -> int:
    first = ctx.data[next(iter(ctx.data))]
    runs = first if ctx.folds and split == "val" else first[:1]
    return sum(len(_correct(r, split)) for r in runs)


def _notes(ctx: Context, split: str) -> list[str]:
    """What the claims cover and what they do not, in plain words."""
    runs, pairs = len(ctx.sources), len(ctx.summary["pairs"][split])
    notes = []
    if pairs > 1:
        notes.append(f"Several comparisons: Holm's correction over the {pairs} pairs of this split "
                     "(each sentence shows the raw and the adjusted p; a claim needs the adjusted "
                     "p below 0.05). The intervals are for each pair alone. Results on the other "
                     "split are descriptive and not part of this family.")
    if ctx.folds and split == "val":
        notes.append(f"Each fold's validation images also chose that fold's epoch (lowest "
                     f"validation loss), so these figures are optimistic. The deciding test is "
                     f"Nadeau and Bengio's corrected resampled t-test over the {runs} folds (the "
                     "folds' training sets overlap; a plain t-test over folds is too liberal).")
    elif split == "val":
        notes.append("There is no test split: these claims rest on the validation split, which "
                     "also chose each run's epoch, so they are optimistic for the chosen epochs "
                     "(--test-fraction or a test/ folder gives held-out images).")
    if runs == 1:
        notes.append("One training run per model: training randomness is not covered. These "
                     "results compare these trained weights on images like these, not the "
                     "architectures; a claim about the architectures needs --seeds 3 or more.")
    elif runs < statistics.MIN_RUNS and not (ctx.folds and split == "val"):
        notes.append(f"{runs} runs per model are too few to estimate training randomness, so it is "
                     "not covered: the exact test over images uses every run (per image, summed "
                     "over the runs). A claim about the architectures needs --seeds 3 or more.")
    elif ctx.folds and split != "val":
        notes.append(f"The {runs} fold runs each test the same images and are treated as repeated "
                     "training runs; their training sets overlap, so the spread between them may "
                     "understate that between independently drawn training sets.")
    elif not ctx.folds:
        notes.append(f"The {runs} runs per model share one split: the intervals hold training "
                     "randomness (initialisation, augmentation, batch order) and image sampling, "
                     "not a different draw of the training images.")
    return notes


def claims_section(ctx: Context) -> Section:
    """The page's first section: the claims, on the held-out split when there is one."""
    split = ctx.summary["claims_split"]
    models = ctx.summary["models"]
    runs = len(ctx.sources)
    where = (f"the test split ({_split_size(ctx, 'test')} images, never used to choose anything)"
             if split == "test" else
             f"the validation split ({_split_size(ctx, 'val')} images; it chose each run's epoch)")
    what = ("accuracy (95% Wilson interval over the images)" if runs == 1 else
            f"accuracy, mean ± sd over {runs} runs" + (" (95% t interval over the runs)"
                                                       if runs >= statistics.MIN_RUNS else ""))
    header = f"| model | {'test' if split == 'test' else 'validation'} {what} |"
    rule = "|---|---:|"
    if split == "test":
        header += " validation accuracy (chose the epochs) |"
        rule += "---:|"
    lines = [f"Claims on {where}.", "", header, rule]
    for model in models.values():
        row = f"| {model['display_name']} | {_accuracy_cell(model, split)} |"
        if split == "test":
            row += f" {_accuracy_cell(model, 'val')} |"
        lines.append(row)
    pairs = ctx.summary["pairs"][split]
    if pairs:
        lines += [""] + [f"- {pair['sentence']}" for pair in pairs]
    lines += [""] + [line for note in _notes(ctx, split) for line in (note, "")]
    return Section("claims", [f"## {CLAIMS_TITLE}", "", *lines[:-1]])


def split_section(ctx: Context, split: str) -> Section:
    models, runs = ctx.summary["models"], len(ctx.sources)
    lines = ["", f"## {SPLIT_TITLES[split]}", ""]
    if runs == 1:
        lines += ["Accuracy with its 95% Wilson interval over the images.", "",
                  "| model | accuracy (95% CI) | macro-F1 | loss |", "|---|---:|---:|---:|"]
        for model in models.values():
            est = model[split]
            lines.append(f"| {model['display_name']} | {_cell(est['accuracy_over_images'])} | "
                         f"{est['macro_f1']['mean']:.4f} | {est['loss']['mean']:.4f} |")
    else:
        lines += [f"Mean ± standard deviation over {runs} runs" + (
                  ", with the 95% t interval of the mean over the runs (training randomness on these "
                  "images; the pairs below also cover the images)." if runs >= statistics.MIN_RUNS else
                  " (too few for an interval over runs; the pairs below cover the images)."), "",
                  "| model | accuracy | macro-F1 | loss |", "|---|---:|---:|---:|"]
        for model in models.values():
            est = model[split]
            lines.append(f"| {model['display_name']} | {_cell(est['accuracy'])} | "
                         f"{_cell(est['macro_f1'])} | {_cell(est['loss'])} |")
        if ctx.folds and split == "val":
            lines += ["", "Each fold's validation images also chose that fold's epoch, so these figures "
                      "are optimistic; over the folds the pairs use Nadeau and Bengio's corrected "
                      "resampled t-test.", "", "Pooled over the folds (every image once): " + "; ".join(
                f"{m['display_name']} {_cell(m['val']['accuracy_over_images'])}" for m in models.values())
                + " (95% Wilson interval)."]
    pairs = ctx.summary["pairs"][split]
    if pairs:
        lines += ["", "| pair | difference (points) | 95% CI | p | Holm-adjusted p | test | covers | "
                  "images A ahead / B ahead (exact test over images, p) | P(fresh run of A beats B) |",
                  "|---|---:|---:|---:|---:|---|---|---:|---:|"]
        for pair in pairs:
            a, b = (models[m]["display_name"] for m in pair["models"])
            primary, images = pair["primary"], pair["over_images"]
            chance = primary["p_fresh_run"]
            lines.append(
                f"| {a} vs {b} | {primary['difference']:+.1f} | {statistics.format_points(primary['low'])} to "
                f"{statistics.format_points(primary['high'])} | "
                f"{statistics.format_p(primary['p_value'], prefix='')} | "
                f"{statistics.format_p(pair['p_holm'], prefix='')} | {primary['test']} | {primary['covers']} | "
                f"{images['a_ahead']} / {images['b_ahead']} ({statistics.format_p(images['p_value'])}) | "
                f"{'–' if chance is None else statistics.format_chance(chance)} |")
        if split != ctx.summary["claims_split"]:
            lines += ["", "This split chose each run's epoch, so these figures are descriptive and "
                      "optimistic; the claims above rest on the test split."]
    return Section(split, lines)


def training_section(ctx: Context) -> Section:
    data, models = ctx.data, ctx.summary["models"]
    runs = len(ctx.sources)
    lines = ["", "## Training", "",
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
              "| class | " + " | ".join(models[n]["display_name"] for n in names) + " |",
              "|---|" + "---:|" * len(names)]
    for cls in data[names[0]][0]["report"]["per_class"]:
        f1 = [np.mean([r["report"]["per_class"][cls]["f1"] for r in data[n]]) for n in names]
        lines.append(f"| {cls} | " + " | ".join(f"{v:.3f}" for v in f1) + " |")
    lines += ["", "![Validation curves of every model](comparison.png)", "",
              "Every number here is recomputed from the runs' `predictions.csv` and `report.json` "
              "(`comparison.json` holds them as data; `python -m training.compare` rebuilds this page).", ""]
    return Section("training", lines)


def sections(ctx: Context) -> list[Section]:
    ordered = [s for s in ("test", "val") if s in ctx.splits]
    extra = [section for build in EXTRA_SECTIONS if (section := build(ctx)) is not None]
    return [claims_section(ctx), *(split_section(ctx, s) for s in ordered), *extra, training_section(ctx)]


def render(ctx: Context, parts: list[Section]) -> str:
    info = ctx.run_info
    lines = [
        f"# Comparison: {info['dataset']}", "",
        f"{info['classes']} classes; {info['split_sizes']}; image size {info['image_size']} px; "
        f"device {info['device']}; {_how(ctx)}. Metrics at each run's best epoch (lowest validation loss).", "",
    ]
    for part in parts:
        lines += part.lines
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


def write(out_dir: Path, sources: list[Source], models: list[str], folds: int, run_info: dict) -> dict:
    """Load the runs, then write comparison.md/.json/.png and each model's errors.png."""
    out_dir, layout = Path(out_dir), RunLayout(out_dir)
    data = load(sources, models)
    first = data[models[0]][0]["report"]
    splits = ["val"] + (["test"] if first.get("test_accuracy") is not None else [])
    pool = sum(len(_correct(r, "val")) for r in data[models[0]]) if folds else None
    ctx = Context(data, splits, sources, folds, pool, run_info, out_dir)
    ctx.summary = summarize(data, splits, folds, pool)
    parts = sections(ctx)
    extra = {p.key: p.data for p in parts if p.data is not None}
    write_json(layout.comparison_json, {"runs": [s.label for s in sources], "pooled_folds": bool(folds),
                                        **run_info, **ctx.summary, "sections": extra})
    write_text(layout.comparison_md, render(ctx, parts))
    plot_curves(layout.comparison_png, data)
    chosen = {name: [row for run in (runs if folds else runs[:1]) for row in run["predictions"]
                     if row["split"] == "val"] for name, runs in data.items()}
    wrong = {name: [row for row in rows if row["label"] != row["predicted"]] for name, rows in chosen.items()}
    everyone_wrong = set.intersection(*({row["path"] for row in rows} for rows in wrong.values()))
    for name, rows in wrong.items():
        errors_png = layout.errors_png(name)
        errors_png.parent.mkdir(parents=True, exist_ok=True)
        plot_errors(errors_png, data[name][0]["report"]["display_name"], rows,
                    everyone_wrong if len(wrong) > 1 else set())
    return ctx.summary


def write_comparison(run_dir: Path, config: TrainConfig, study: list[Member], run_info: dict) -> dict:
    """The comparison of one training command's runs, written into its run folder."""
    run_dir = Path(run_dir)
    return write(run_dir, [Source(run_dir, m) for m in study], list(config.models), config.folds, run_info)

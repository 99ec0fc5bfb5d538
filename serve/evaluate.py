"""``python -m serve.evaluate``: how good are the exported models on labelled images?

    python -m serve.evaluate data/                       # ImageFolder (its test/, else val/, else train/ split if made)
    python -m serve.evaluate images/ --labels-csv labels.csv --out eval/
    python -m serve.evaluate data/ --split val --precision int8
    python -m serve.evaluate data/ --engine all --precision all   # every engine side by side

Every served model of every exported precision (or --precision) classifies the images, in
batches, with the app's decoding and preprocessing. Written to --out: report.json,
report.md, and a confusion-matrix PNG per model and precision: accuracy, macro-F1 (over the
classes present in the data), per-class precision/recall/F1, the top-1 agreement of every
pair of models, and of each INT8 file with its FP32 twin (with --engine all, every engine
and precision of a model beside ONNX Runtime FP32); each accuracy with its 95% Wilson
interval and every pair's exact paired test (McNemar's, with the interval that inverts it;
Holm-adjusted over the pairs), in the words the training comparison uses (common/statistics).
Class names are matched by name; a label the models do not know is a user mistake (exit code
2). Torch-free.
"""
from __future__ import annotations

import argparse
import os
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

import imaging
from common import datasets, statistics
from common.confusion_image import draw_confusion
from common.errors import UserError, run_cli
from common.files import write_json, write_text
from common.metrics import confusion_matrix, macro_f1, per_class_metrics
from serve.batch import Progress, classify_files, default_batch_size, default_workers, model_key
from serve.catalog import ENGINE_CHOICES, PRECISIONS, CatalogError, candidate_pairs, load_catalog
from serve.predict import positive_int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("data", metavar="DATA",
                        help="ImageFolder root, or with --labels-csv the folder its file names are in")
    parser.add_argument("--labels-csv", help="CSV with columns filename,label")
    parser.add_argument("--split", choices=datasets.SPLITS,
                        help="pre-made split folder to use (default: test, else val, else train, if made)")
    parser.add_argument("--models", default="models", help="folder with manifest.json (default: models)")
    parser.add_argument("--engine", choices=(*ENGINE_CHOICES, "all"),
                        default=os.environ.get("RESNET_TRIO_ENGINE", "auto"),
                        help="what runs the models: auto (default; RESNET_TRIO_ENGINE changes it) as "
                             "serve.app chooses, an engine, or all: each installed engine side by side")
    parser.add_argument("--precision", choices=(*PRECISIONS, "all"), default="all",
                        help="auto, fp32, bf16, int8, or all (default): every exported file "
                             "(auto for FP32; with --engine all, every precision)")
    parser.add_argument("--out", default="evaluation", help="report folder (default: evaluation)")
    parser.add_argument("--batch-size", type=positive_int, default=default_batch_size())
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="decoding processes, 0 to decode in this one")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(lambda: evaluate(parse_args(argv)))


def load_models(folder: str, precision: str, engine: str = "auto"):
    """The predictors of the chosen engine(s) and precision(s), FP32 files first."""
    if engine != "all":
        if precision != "all":
            return load_catalog(folder, precision, engine=engine).predictors
        predictors = load_catalog(folder, "auto", engine=engine).predictors
        try:
            predictors += load_catalog(folder, "int8", engine=engine).predictors
        except CatalogError as exc:
            if "no int8 models" not in str(exc):
                raise
        return predictors
    # Every (engine, precision) pair this machine offers, each loaded as such: no choosing.
    pairs = [pair for p in (PRECISIONS[1:] if precision in ("all", "auto") else (precision,))
             for pair in safe_pairs(p)]
    predictors = []
    for pair_engine, pair_precision in pairs:
        try:
            predictors += load_catalog(folder, pair_precision, engine=pair_engine).predictors
        except CatalogError as exc:
            if "no int8 models" not in str(exc) or precision == "int8":
                raise
    return predictors


def safe_pairs(precision: str) -> list[tuple[str, str]]:
    try:
        return candidate_pairs("auto", precision)
    except CatalogError:  # bf16 where this machine cannot: nothing to compare
        return []


def labelled_images(data: Path, labels_csv: str | None, split: str | None) -> tuple[datasets.DatasetIndex, str | None]:
    """The images to evaluate and the pre-made split they are (None: a CSV or a folder without
    splits). ``split`` picks one; by default the held-out one: test, else val, else train."""
    if labels_csv:
        return datasets.index_csv(Path(labels_csv), data), None
    premade = datasets.premade_splits(data)
    if split is None and premade:
        split = next(s for s in ("test", "val", "train") if s in premade)
    if split is None:
        return datasets.index_class_folders(data), None
    if split not in premade:
        raise UserError(f"no '{split}' folder in '{data}'"
                        + (f" (found: {', '.join(premade)})" if premade else ""))
    return datasets.index_class_folders(data / split), split


def metrics(truth: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1 (over the classes present), the figures of each class present, the
    confusion matrix."""
    confusion = confusion_matrix(truth, predicted, len(class_names))
    per_class = per_class_metrics(confusion, class_names)
    return {"accuracy": float((truth == predicted).mean()), "macro_f1": macro_f1(per_class),
            "per_class": {name: figures for name, figures in per_class.items() if figures["support"]},
            "confusion": confusion.tolist()}


def evaluate(args: argparse.Namespace) -> int:
    labelled, split = labelled_images(Path(args.data), args.labels_csv, args.split)
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    predictors = load_models(args.models, args.precision, args.engine)
    class_names = predictors[0].class_names
    samples = labelled.splits["all"]
    label_of = {s.path: labelled.class_names[s.label] for s in samples}
    unknown = sorted(set(label_of.values()) - set(class_names))
    if unknown:
        raise UserError(f"label(s) {', '.join(unknown)} in '{labelled.where}' are not classes of the "
                        f"models ({', '.join(class_names)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [s.path for s in samples]
    print(f"Evaluating {', '.join(f'{p.display_name} {p.engine} {p.precision}' for p in predictors)} on "
          f"{len(paths)} image(s) of {labelled.where}", file=sys.stderr, flush=True)
    used, predicted = [], {model_key(p): [] for p in predictors}
    failures = [(bad["path"], bad["reason"]) for bad in labelled.bad_files]
    progress = Progress(len(paths))
    for batch in classify_files(paths, predictors, args.batch_size, args.workers,
                                imaging.SERVING_MAX_PIXELS, progress):
        used += batch.paths
        for key, probs in batch.probabilities.items():
            predicted[key] += probs.argmax(1).tolist()
        failures += batch.failures
    progress.close()
    if not used:
        raise UserError(f"none of the {len(paths)} image(s) in '{labelled.where}' could be used")
    truth = np.array([class_names.index(label_of[p]) for p in used])
    report = {"data": labelled.where, "split": split, "images": len(used),
              "class_names": class_names, "unusable": [{"path": p, "reason": r} for p, r in failures],
              "models": [], "agreement": [], "int8_vs_fp32": [], "engines": []}
    for p in predictors:
        key = model_key(p)
        result = {"name": p.name, "display_name": p.display_name, "precision": p.precision,
                  "engine": p.engine,
                  "file": p.path.name, **metrics(truth, np.array(predicted[key]), class_names),
                  "confusion_png": f"confusion_{key}.png"}
        interval = statistics.wilson(int((np.array(predicted[key]) == truth).sum()), len(truth))
        result["accuracy_ci"] = [interval.low, interval.high]
        draw_confusion(out / result["confusion_png"], result["confusion"], class_names,
                       f"{p.display_name} ({p.engine} {p.precision}): accuracy {result['accuracy']:.1%}")
        report["models"].append(result)
    for a, b in combinations(predictors, 2):
        agree = float(np.mean(np.array(predicted[model_key(a)]) == np.array(predicted[model_key(b)])))
        pair = {"a": model_key(a), "b": model_key(b), "top1_agreement": agree}
        if args.engine == "all":  # one model's engines against ONNX Runtime FP32; models alike
            if a.name == b.name and (a.engine, a.precision) == ("onnxruntime", "fp32"):
                report["engines"].append(pair)
            elif a.name != b.name and (a.engine, a.precision) == (b.engine, b.precision):
                report["agreement"].append(pair)
            continue
        twins = a.name == b.name and {a.file_precision, b.file_precision} == {"fp32", "int8"}
        report["int8_vs_fp32" if twins else "agreement"].append(pair)
    report["pairwise"] = pairwise(predictors, {k: np.array(v) == truth for k, v in predicted.items()})
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    for path, reason in failures:
        print(f"  unusable: {path}: {reason}", file=sys.stderr)
    best = max(report["models"], key=lambda m: m["accuracy"])
    print(f"Wrote {out / 'report.md'}: {len(used)} image(s), highest accuracy {best['accuracy']:.1%} "
          f"({best['display_name']} {best['engine']} {best['precision']}; the pairwise tests say which "
          "differences the images support)", file=sys.stderr)
    return 0


def pairwise(predictors, correct: dict[str, np.ndarray]) -> list[dict]:
    """Every pair of model files on the same images: accuracy difference (the one ahead first),
    McNemar's exact test with its interval, Holm-adjusted over the pairs, and the sentence."""
    found = []
    for a, b in combinations(predictors, 2):
        if statistics.over_images(correct[model_key(a)], correct[model_key(b)]).difference < 0:
            a, b = b, a
        found.append((a, b, statistics.over_images(correct[model_key(a)], correct[model_key(b)])))
    adjusted = statistics.holm([result.p_value for _, _, result in found])
    return [{"a": model_key(a), "b": model_key(b), **result.as_dict(), "p_holm": p_holm,
             "sentence": statistics.sentence(f"{a.display_name} ({a.precision})", f"{b.display_name} ({b.precision})",
                                             result, p_holm, len(found))}
            for (a, b, result), p_holm in zip(found, adjusted)]


def markdown(report: dict) -> str:
    lines = ["# Evaluation of the exported models", "",
             f"Data: `{report['data']}`" + (f" (split `{report['split']}`)" if report["split"] else "")
             + f", {report['images']} image(s) used, {len(report['unusable'])} unusable.", "",
             "| model | engine | precision | accuracy (95% Wilson interval) | macro-F1 | confusion matrix |",
             "|---|---|---|---:|---:|---|"]
    for m in report["models"]:
        low, high = m["accuracy_ci"]
        lines.append(f"| {m['display_name']} | {m['engine']} | {m['precision']} | {m['accuracy']:.4f} ({low:.4f}–{high:.4f}) | "
                     f"{m['macro_f1']:.4f} | [{m['confusion_png']}]({m['confusion_png']}) |")
    if report["pairwise"]:
        lines += ["", "## What the data supports", "",
                  "Each exported file is one trained model, so these compare the files on images like "
                  "these; the images are held out only if the models never saw them in training or in "
                  "choosing their epoch.", ""]
        lines += [f"- {p['sentence']}" for p in report["pairwise"]]
        lines += ["", "| a | b | difference (points) | 95% CI | p | Holm-adjusted p | test | only a right / only b right |",
                  "|---|---|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {p['a']} | {p['b']} | {p['difference']:+.1f} | {statistics.format_points(p['low'])} to "
                  f"{statistics.format_points(p['high'])} | {statistics.format_p(p['p_value'], prefix='')} | "
                  f"{statistics.format_p(p['p_holm'], prefix='')} | {p['test']} | {p['a_ahead']} / {p['b_ahead']} |"
                  for p in report["pairwise"]]
    for title, pairs in (("Top-1 agreement between models", report["agreement"]),
                         ("INT8 files against their FP32 twins", report["int8_vs_fp32"]),
                         ("Each engine and precision against ONNX Runtime FP32", report["engines"])):
        if pairs:
            lines += ["", f"## {title}", "", "| a | b | top-1 agreement |", "|---|---|---:|"]
            lines += [f"| {p['a']} | {p['b']} | {p['top1_agreement']:.4f} |" for p in pairs]
    lines += ["", "## Per class", ""]
    for m in report["models"]:
        lines += [f"### {m['display_name']} ({m['engine']} {m['precision']})", "",
                  "| class | precision | recall | F1 | images |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                  for c, v in m["per_class"].items()]
        lines.append("")
    if report["unusable"]:
        lines += ["## Unusable files", ""] + [f"- `{u['path']}`: {u['reason']}" for u in report["unusable"]]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())

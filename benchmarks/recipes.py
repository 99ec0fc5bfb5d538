"""``python -m benchmarks.recipes``: the original recipe against the improved one.

Both recipes train the same models on the same data and split, for the same number of epochs
(the time budget), through ``python -m training.run`` itself (``--recipe original`` and
``--recipe improved``, nothing else changed). Per model it reports each recipe's validation and
test accuracy at its best epoch, the improved recipe's gain in points, and the ratio of their
training times (the improved recipe mixes batches and averages the weights every step).

Prints a table and writes benchmarks/results/recipes.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import model_names, RESULTS_DIR, command_line, machine, markdown_table, write_json
from common.run_layout import RunLayout
from training.config import ORIGINAL, QUICK_PROFILE
from training.run import main as train_main
from training.study import run_members

RECIPES = ("original", "improved")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="ImageFolder root (default: the built-in dataset, quick profile)")
    parser.add_argument("--models", default="resnet34", help="comma-separated model names (default: resnet34)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of both recipes (default: {QUICK_PROFILE['epochs']}, the quick "
                             f"profile's, without --data; {ORIGINAL['epochs']}, the original recipe's, with it)")
    parser.add_argument("--own-epochs", action="store_true",
                        help="each recipe its own number of epochs instead (with --data)")
    parser.add_argument("--image-size", type=int, default=None, help="px (default: as training.run chooses)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: as training.run chooses")
    parser.add_argument("--test-fraction", type=float, default=QUICK_PROFILE["test_fraction"],
                        help=f"share of the images held out for testing (default: {QUICK_PROFILE['test_fraction']})")
    parser.add_argument("--seeds", type=int, default=1, help="runs per model and recipe (default: 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--runs", help="keep the training runs in this folder (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "recipes.json"), help="JSON results file")
    return parser.parse_args(argv)


def training_args(args: argparse.Namespace, recipe: str, out: Path) -> list[str]:
    """The training.run command line of one recipe: everything but --recipe (and --out) shared."""
    argv = ["--recipe", recipe, "--models", args.models, "--seeds", str(args.seeds),
            "--test-fraction", str(args.test_fraction), "--device", args.device,
            "--workers", str(args.workers), "--out", str(out)]
    if args.data:
        argv += ["--data", args.data]
    if not args.own_epochs:
        argv += ["--epochs", str(args.epochs or (ORIGINAL["epochs"] if args.data else QUICK_PROFILE["epochs"]))]
    for flag, value in (("--image-size", args.image_size), ("--batch-size", args.batch_size)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def collect(run_dir: Path, names: list[str]) -> dict:
    """Per model: the mean over its runs (seeds) of what the comparison needs, and each run's."""
    out = {}
    for name in names:
        reports = [json.loads(RunLayout(run_dir).member_files(name, member).report.read_text())
                   for member in run_members(run_dir)]
        keys = ("val_accuracy", "test_accuracy", "best_epoch", "epochs_run", "seconds")
        out[name] = {key: statistics.mean(r[key] for r in reports) for key in keys if key in reports[0]}
        out[name]["runs"] = [{key: r[key] for key in keys if key in r} for r in reports]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    names = model_names(args.models)
    if names is None:
        return 2
    with tempfile.TemporaryDirectory(prefix="recipes-") as scratch:
        runs = Path(args.runs) if args.runs else Path(scratch)
        results = {"command": command_line(argv, "benchmarks.recipes"), "machine": machine(),
                   "data": args.data or "built-in (quick profile)", "recipes": {}}
        for recipe in RECIPES:
            command = training_args(args, recipe, runs / recipe)
            print(f"--- python -m training.run {' '.join(command)}", flush=True)
            started = time.perf_counter()
            code = train_main(command)
            if code:
                return code
            results["recipes"][recipe] = {"training_args": command, "wall_seconds": time.perf_counter() - started,
                                          "models": collect(runs / recipe, names)}
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, gains = [], {}
    for name in names:
        before, after = (results["recipes"][r]["models"][name] for r in RECIPES)
        gains[name] = {f"{split}_points": 100 * (after[f"{split}_accuracy"] - before[f"{split}_accuracy"])
                       for split in ("val", "test") if f"{split}_accuracy" in before}
        gains[name]["training_time_ratio"] = after["seconds"] / before["seconds"]
        for recipe, r in zip(RECIPES, (before, after)):
            rows.append([name, recipe, r["val_accuracy"], r.get("test_accuracy", "-"),
                         f"{r['best_epoch']:g} / {r['epochs_run']:g}", r["seconds"]])
    results["improved_vs_original"] = gains
    print("\n" + markdown_table(["model", "recipe", "val accuracy", "test accuracy",
                                 "best / run epochs", "training s"], rows))
    for name, gain in gains.items():
        points = ", ".join(f"{split} {gain[f'{split}_points']:+.1f}" for split in ("val", "test")
                           if f"{split}_points" in gain)
        print(f"{name}: improved - original: {points} points; training time x{gain['training_time_ratio']:.2f}")
    print(f"\nWrote {write_json(Path(args.out), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks.memory``: does training's memory grow with the dataset?

Writes a large generated ImageFolder (``--large`` images, 20,000 by default) and a small one
(``--small``, 2,000: links to the first files of the large one, under other paths, so each is
decoded on its own), then trains one model for one epoch on each, every run in a process of
its own with a cold cache, and reports each run's peak resident memory (the training
process's ``ru_maxrss``) and the ratio large / small: 1.0 means memory does not grow with the
data (target <= 1.3). ``--in-memory`` repeats both runs with ``--no-cache`` for comparison.

Prints a table and writes benchmarks/results/memory.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import RESULTS_DIR, command_line, machine, markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 5
TARGET_RATIO = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2_000, help="images in the small dataset")
    parser.add_argument("--large", type=int, default=20_000, help="images in the large dataset")
    parser.add_argument("--image-size", type=int, default=48, help="training size in px (default: 48)")
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--in-memory", action="store_true", help="also run both with --no-cache")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "memory.json"), help="JSON results file")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_dataset(root: Path, count: int) -> None:
    """``count`` JPEGs of 96 x 128 px in CLASSES classes: tinted noise, quick to make."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = i % CLASSES
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = np.array([40 + 40 * label, 200 - 30 * label, 120], np.int16)
        pixels = np.clip(tint + rng.integers(-60, 60, (96, 128, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def link_subset(source: Path, root: Path, count: int) -> None:
    files = sorted(source.rglob("*.jpg"), key=lambda f: f.name)[:count]  # every class
    for f in files:
        target = root / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)


def child(args: list[str]) -> int:
    """Train in this process, then print its peak resident memory (and its helpers')."""
    from training.run import main

    code = main(args)
    usage = {"self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
             "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
    print("PEAK " + json.dumps(usage), flush=True)
    return code


def measure(data: Path, work: Path, name: str, args, cached: bool) -> dict:
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    flags = ["--data", str(data), "--models", args.model, "--epochs", "1",
             "--image-size", str(args.image_size), "--out", str(work / f"run-{name}")]
    flags += ["--cache-dir", str(cache)] if cached else ["--no-cache"]
    print(f"-- {name}: training.run {' '.join(flags)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("PEAK "))
    usage = json.loads(line[5:])
    print(f"-- {name}: peak {usage['self_kb'] / 1024:.0f} MB (decoding processes "
          f"{usage['children_kb'] / 1024:.0f} MB)", flush=True)
    return usage


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child(args.child)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        large, small = work / "large", work / "small"
        if not large.is_dir():
            print(f"-- writing {args.large} images to {large}", flush=True)
            write_dataset(large, args.large)
        if not small.is_dir():
            link_subset(large, small, args.small)
        modes = [True, False] if args.in_memory else [True]
        peaks = {}
        for cached in modes:
            mode = "disk cache" if cached else "in memory"
            for name, data, count in (("small", small, args.small), ("large", large, args.large)):
                peaks[(mode, count)] = measure(data, work, f"{name}-{'cache' if cached else 'memory'}",
                                               args, cached)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows, results = [], {}
    for mode in dict.fromkeys(m for m, _ in peaks):
        small_mb, large_mb = (peaks[(mode, n)]["self_kb"] / 1024 for n in (args.small, args.large))
        ratio = large_mb / small_mb
        rows.append([mode, f"{small_mb:.0f}", f"{large_mb:.0f}", f"{ratio:.2f}x"])
        results[mode] = {"small_mb": small_mb, "large_mb": large_mb, "ratio": ratio,
                         "decoding_processes_mb": {str(n): peaks[(mode, n)]["children_kb"] / 1024
                                                   for n in (args.small, args.large)}}
    print("\n" + markdown_table(["decoded images", f"peak MB, {args.small} images",
                                 f"peak MB, {args.large} images", f"ratio (target <= {TARGET_RATIO})"], rows))
    out = write_json(Path(args.out), {"command": command_line(argv, "benchmarks.memory"), "machine": machine(),
                                      "image_size": args.image_size, "model": args.model,
                                      "images": [args.small, args.large], "results": results})
    print(f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

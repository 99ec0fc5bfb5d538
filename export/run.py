"""``python -m export.run``: export a run's best checkpoints to ONNX and prove parity.

With no arguments: every model of the newest run under runs/ into models/<model>.onnx, plus
models/manifest.json, models/<model>.parity.json and a few example images for the app.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import DEFAULT_OPSET, ExportError, export_model, sha256_of
from export.parity import check_parity
from serve.predictor import create_session
from training import checkpoint
from training.checkpoint import CheckpointError
from training.models import MODEL_NAMES
from training.reports import write_json
from training.run import RUNS_DIR, newest_run
from training.config import ConfigError
from training.transforms import EvalTransform, decode

EXAMPLES_PER_CLASS = 2
PARITY_IMAGES = 256  # at most this many validation images go through the parity check


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.run", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run folder (default: the newest under runs/)")
    parser.add_argument("--out", default="models", help="output folder (default: models)")
    parser.add_argument("--models", help="comma-separated model names (default: all in the run)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: 18)")
    return parser.parse_args(argv)


def validation_images(run_dir: Path, size: tuple[int, int], limit: int = PARITY_IMAGES):
    """The run's own validation images through the real preprocessing, and their paths."""
    splits_file = run_dir / "splits.json"
    if not splits_file.is_file():
        return np.empty((0, 3, *size), np.float32), []
    paths = [p for p, _ in json.loads(splits_file.read_text())["val"]][:limit]
    transform = EvalTransform()
    kept, tensors = [], []
    for p in paths:
        try:
            tensors.append(transform(decode(p, size)))
            kept.append(p)
        except (OSError, ValueError):  # the file changed since training: parity needs no more
            continue
    if not tensors:
        return np.empty((0, 3, *size), np.float32), []
    return torch.stack(tensors).numpy(), kept


def copy_examples(run_dir: Path, out_dir: Path) -> list[str]:
    """A few validation images per class, for the app's clickable examples."""
    splits_file = run_dir / "splits.json"
    if not splits_file.is_file():
        return []
    splits = json.loads(splits_file.read_text())
    examples_dir = out_dir / "examples"
    shutil.rmtree(examples_dir, ignore_errors=True)
    examples_dir.mkdir(parents=True)
    names, taken = [], {}
    for path, label in splits["val"]:
        cls = splits["class_names"][label]
        if taken.get(cls, 0) >= EXAMPLES_PER_CLASS or not Path(path).is_file():
            continue
        taken[cls] = taken.get(cls, 0) + 1
        target = examples_dir / f"{cls}_{taken[cls]}{Path(path).suffix.lower()}"
        shutil.copyfile(path, target)
        names.append(f"examples/{target.name}")
    return names


def export_one(name: str, run_dir: Path, out_dir: Path, opset: int) -> dict:
    ckpt_path = run_dir / name / "best.pt"
    ckpt = checkpoint.load(ckpt_path)
    model = checkpoint.rebuild_model(ckpt, expected_architecture=name)
    out_path = out_dir / f"{name}.onnx"
    tmp = export_model(ckpt, sha256_of(ckpt_path), out_path, opset)
    try:
        images, _ = validation_images(run_dir, tuple(ckpt["image_size"]))
        report = check_parity(model, create_session(tmp), images)
        print(f"{name}: parity {report.summary()}", flush=True)
        write_json(out_dir / f"{name}.parity.json", {"model": name, **report.as_dict()})
        if not report.passed:
            raise ExportError(f"{name}: parity check failed ({report.summary()})")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    from serve.predictor import Predictor

    meta = Predictor(out_path).metadata
    return {
        "name": name, "file": out_path.name, "precision": "fp32",
        **{k: meta[k] for k in ("display_name", "architecture", "resize", "checkpoint_sha256",
                                "torch_version", "onnx_version", "exported_at")},
        "class_names": json.loads(meta["class_names"]), "input_size": json.loads(meta["input_size"]),
        "mean": json.loads(meta["mean"]), "std": json.loads(meta["std"]),
        "val_accuracy": float(meta["val_accuracy"]),
        "size_bytes": out_path.stat().st_size, "sha256": sha256_of(out_path),
        "parity": report.as_dict(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run_dir = Path(args.run) if args.run else newest_run(RUNS_DIR)
        if not run_dir.is_dir():
            raise ExportError(f"run folder '{run_dir}' does not exist")
        available = [n for n in MODEL_NAMES if (run_dir / n / "best.pt").is_file()]
        names = [m.strip() for m in args.models.split(",")] if args.models else available
        missing = [n for n in names if n not in available]
        if missing or not names:
            raise ExportError(f"no best.pt for {', '.join(missing) or 'any model'} in '{run_dir}'")
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"Exporting {', '.join(names)} from {run_dir} to {out_dir}/ (opset {args.opset})", flush=True)
        entries = [export_one(name, run_dir, out_dir, args.opset) for name in names]
        examples = copy_examples(run_dir, out_dir)
        write_json(out_dir / "manifest.json", {"run": str(run_dir), "models": entries, "examples": examples})
        print(f"Wrote {len(entries)} model(s), {len(examples)} example image(s) and "
              f"{out_dir / 'manifest.json'}", flush=True)
        return 0
    except (ExportError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

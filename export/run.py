"""``python -m export.run``: export a run's best checkpoints to ONNX and prove parity.

With no arguments: every model of the newest run under runs/ into models/<model>.onnx, plus
models/manifest.json, models/<model>.parity.json, the model card models/README.md and a few
example images for the app.
With ``--quantize int8`` also models/<model>.int8.onnx, its report models/<model>.int8.json and
models/<model>.int8-sensitivity.json: its layers ranked by what INT8 costs in each where every
layer INT8 misses the targets or with ``--int8-search always`` (otherwise it says the ranking
was skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.calibration import DEFAULT_TARGET_ACCURACY
from common.errors import UserError, run_cli
from common.files import atomic_folder, sha256_of, temporary_path, write_json
from common.run_layout import RUNS_DIR, Member, RunLayout, newest_run
from export import model_card
from export.onnx_export import (CALIBRATION_KEYS, DEFAULT_OPSET, ExportError, export_model, metadata_for,
                                temperature_of)
from export.parity import check_parity
from export.fidelity import TARGETS as INT8_TARGETS
from export.fidelity import compare_files
from export.fidelity import describe as describe_fidelity
from export.quantize import CALIBRATION_IMAGES, Quantizer, one_line_errors
from export.sensitivity import Measure, choose_float_layers, summary
from export.triton import write_repository
from imaging.preprocessing import Preprocessing
from serve.catalog import CHECK_VALIDATION_IMAGES
from serve.predictor import create_session
from training import checkpoint
from training.models import MODEL_NAMES
from training.study import run_members, split_lists
from training.transforms import EvalTransform, pixel_tensor

EXAMPLES_PER_CLASS = 2
PARITY_IMAGES = 256  # at most this many validation images go through the parity check
INT8_REPORT_IMAGES = 1000  # at most this many validation images measure INT8 against FP32


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.run", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run folder (default: the newest under runs/)")
    parser.add_argument("--out", default="models", help="output folder (default: models)")
    parser.add_argument("--models", help="comma-separated model names (default: all in the run)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: 18)")
    parser.add_argument("--triton", metavar="DIR",
                        help="also write a Triton Inference Server model repository to DIR")
    parser.add_argument("--quantize", choices=["int8"],
                        help="also write <model>.int8.onnx: static INT8, calibrated on training images")
    parser.add_argument("--int8-search", choices=["auto", "always", "off"], default="auto",
                        help="with --quantize int8: rank the layers by INT8 sensitivity and keep the "
                        "fewest float that meet the targets, for models that miss them fully INT8 "
                        "(auto, the default), rank every model's layers too (always), or keep "
                        "every layer INT8 (off)")
    parser.add_argument("--abstain-accuracy", type=target_accuracy, default=DEFAULT_TARGET_ACCURACY,
                        metavar="A", help="a model is unsure below the top probability at which the "
                        "validation predictions it keeps are this accurate; recorded in each file's "
                        f"metadata as abstain_threshold (default: {DEFAULT_TARGET_ACCURACY})")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="with --seeds runs: export this seed's run "
                       "(default: each model's run with the lowest validation loss)")
    which.add_argument("--fold", type=int, help="with --folds runs: export this fold's run, 1 to K "
                       "(default: fold 1; folds validate on different images, so their losses "
                       "do not rank them)")
    return parser.parse_args(argv)


def target_accuracy(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def study_of(run_dir: Path) -> list[Member]:
    """The runs a run folder holds per model (a folder without config.json: one run)."""
    return run_members(run_dir) if RunLayout(run_dir).config.is_file() else [Member(None, 0)]


def choose_member(run_dir: Path, name: str, study: list[Member], seed: int | None,
                  fold: int | None) -> Member:
    """Which of a model's runs to export (see --seed and --fold)."""
    labels = ", ".join(m.label for m in study if m.label) or "one run"
    if seed is not None:
        match = [m for m in study if m.seed == seed and m.fold is None]
        if not match:
            raise UserError(f"'{run_dir}' has no run with seed {seed} (it has: {labels})")
        return match[0]
    if fold is not None:
        match = [m for m in study if m.fold is not None and m.fold + 1 == fold]
        if not match:
            raise UserError(f"'{run_dir}' has no fold {fold} (it has: {labels})")
        return match[0]
    if len(study) == 1 or study[0].fold is not None:
        return study[0]

    def val_loss(member: Member) -> float:
        report = RunLayout(run_dir).member_files(name, member).report
        return json.loads(report.read_text())["val_loss"] if report.is_file() else float("inf")

    return min(study, key=val_loss)


def how_chosen(study: list[Member], seed: int | None, fold: int | None) -> str:
    """Why this run was exported, for the log and the model card (best of N said where it is)."""
    if len(study) == 1:
        return "the only run"
    if seed is not None or fold is not None:
        return f"chosen by --{'seed' if seed is not None else 'fold'} among {len(study)} runs"
    if study[0].fold is not None:
        return f"fold 1 of {len(study)} (the default; --fold picks another)"
    return (f"the lowest validation loss among {len(study)} runs (best of {len(study)}, so its "
            "validation figures are optimistic; its test figures are not)")


def split_images(run_dir: Path, split: str, preprocessing: Preprocessing, limit: int,
                 member: Member | None = None):
    """One split of a run (splits.json) through the real preprocessing: images, labels, paths."""
    listed = listed_split(run_dir, split, member)
    transform = EvalTransform(preprocessing)
    kept, labels, tensors = [], [], []
    for p, label in listed[:limit]:
        try:
            tensors.append(transform(pixel_tensor(p, preprocessing)))
        except (OSError, ValueError):  # the file changed since training: skip it
            continue
        kept.append(p)
        labels.append(label)
    if not tensors:
        return np.empty((0, 3, *preprocessing.input_size), np.float32), np.empty(0, np.int64), []
    return torch.stack(tensors).numpy(), np.asarray(labels, np.int64), kept


def listed_split(run_dir: Path, split: str, member: Member | None = None) -> list:
    """[[path, label], ...] of one split of the run (or of one fold's run)."""
    if not RunLayout(run_dir).splits.is_file():
        return []
    return split_lists(run_dir, member or Member(None, 0)).get(split, [])


def validation_images(run_dir: Path, preprocessing: Preprocessing, limit: int = PARITY_IMAGES,
                      member: Member | None = None):
    """The run's own validation images through the real preprocessing, and their paths."""
    images, _, paths = split_images(run_dir, "val", preprocessing, limit, member)
    return images, paths


def copy_examples(run_dir: Path, out_dir: Path, member: Member | None = None) -> list[str]:
    """A few validation images per class, for the app's clickable examples."""
    splits_file = RunLayout(run_dir).splits
    if not splits_file.is_file():
        return []
    class_names = json.loads(splits_file.read_text())["class_names"]
    names, taken = [], {}
    with atomic_folder(out_dir / "examples") as examples_dir:
        for path, label in listed_split(run_dir, "val", member):
            cls = class_names[label]
            if taken.get(cls, 0) >= EXAMPLES_PER_CLASS or not Path(path).is_file():
                continue
            taken[cls] = taken.get(cls, 0) + 1
            target = examples_dir / f"{cls}_{taken[cls]}{Path(path).suffix.lower()}"
            shutil.copyfile(path, target)
            names.append(f"examples/{target.name}")
    return names


def copy_check_images(run_dir: Path, out_dir: Path, member: Member | None = None) -> list[str]:
    """Up to CHECK_VALIDATION_IMAGES validation images that serve.app's engine choice checks
    fidelity on (beside the examples), copied into the models folder: the server reads no file
    outside it, and the serving image carries them."""
    names = []
    with atomic_folder(out_dir / "check") as folder:
        for path, _ in listed_split(run_dir, "val", member):
            if len(names) == CHECK_VALIDATION_IMAGES:
                break
            if Path(path).is_file():
                target = folder / f"{len(names):03d}{Path(path).suffix.lower()}"
                shutil.copyfile(path, target)
                names.append(f"check/{target.name}")
    return names


def quantize_one(entry: dict, ckpt: dict, ckpt_sha256: str, run_dir: Path, out_dir: Path,
                 member: Member, search: str = "auto",
                 abstain_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict:
    """<model>.int8.onnx from the exported FP32 file, with the fewest layers kept float that meet
    the targets on the validation images (export/fidelity.py, export/sensitivity.py), its
    report, its sensitivity report and its manifest entry."""
    job = Int8Job.of(entry, ckpt, ckpt_sha256, run_dir, out_dir, member, abstain_accuracy)
    result, ranked, validation = write_int8(job, search)
    report = write_int8_reports(job, result, ranked, validation)
    if result is not None:
        print(summary(job.name, result, ranked), flush=True)
    print(int8_line(job.name, validation), flush=True)
    out_path = job.out_path
    return {**{k: v for k, v in entry.items() if k != "parity"}, "file": out_path.name,
            "precision": "int8", "exported_at": job.metadata["exported_at"],
            "size_bytes": out_path.stat().st_size, "sha256": sha256_of(out_path),
            "quantization": report}


@dataclass
class Int8Job:
    """What quantizing one model reads: its files, metadata, calibration and validation images."""

    name: str
    fp32_path: Path
    out_path: Path
    metadata: dict
    calibration: np.ndarray
    images: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, entry: dict, ckpt: dict, ckpt_sha256: str, run_dir: Path, out_dir: Path,
           member: Member, abstain_accuracy: float = DEFAULT_TARGET_ACCURACY) -> "Int8Job":
        name, spec = entry["name"], checkpoint.preprocessing_of(ckpt)
        calibration, _, _ = split_images(run_dir, "train", spec, CALIBRATION_IMAGES, member)
        if not len(calibration):
            raise ExportError(f"{name}: no training images listed in '{RunLayout(run_dir).splits}' "
                              "to calibrate INT8 on")
        images, labels, _ = split_images(run_dir, "val", spec, INT8_REPORT_IMAGES, member)
        return cls(name, out_dir / entry["file"], out_dir / f"{name}.int8.onnx",
                   # the FP32 file's temperature and threshold
                   metadata_for(ckpt, ckpt_sha256, "int8", entry["training_run"], abstain_accuracy),
                   calibration, images, labels)


def write_int8(job: Int8Job, search: str):
    """Quantize (searching for float layers where every layer INT8 misses the targets, unless
    ``search`` is off), measure the file against FP32 and move it into place: (the search's
    result and ranking, or None, None; the file's validation measure)."""
    fp32_session, tmp = create_session(job.fp32_path), temporary_path(job.out_path)
    try:
        with one_line_errors(job.fp32_path, tmp), Quantizer(job.fp32_path, job.calibration) as quantizer, \
                tempfile.TemporaryDirectory(prefix="int8-search-") as work:
            result, ranked = None, None
            if len(job.images) and search != "off":
                measure = Measure(quantizer, job.metadata, Path(work), fp32_session, job.images,
                                  job.labels, create_session)
                result, ranked = choose_float_layers(measure, always_rank=search == "always")
            quantizer.quantize(tmp, job.metadata, result.float_layers if result else [])
        validation = compare_files(fp32_session, create_session(tmp), job.images, job.labels)
        os.replace(tmp, job.out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return result, ranked, validation


def write_int8_reports(job: Int8Job, result, ranked: dict | None, validation: dict) -> dict:
    """<model>.int8.json (returned) and, where layers were ranked, <model>.int8-sensitivity.json."""
    out_dir = job.out_path.parent
    sensitivity_file = out_dir / f"{job.name}.int8-sensitivity.json"
    report = {"model": job.name, "file": job.out_path.name, "fp32_file": job.fp32_path.name,
              "calibration_images": len(job.calibration), "validation": validation,
              "targets": INT8_TARGETS.as_dict(), "meets_targets": INT8_TARGETS.met(validation),
              **float_layer_report(result, ranked, sensitivity_file.name)}
    write_json(out_dir / f"{job.name}.int8.json", report)
    if ranked is not None:
        write_json(sensitivity_file, {"model": job.name, **ranked})
    else:
        sensitivity_file.unlink(missing_ok=True)
    return report


def int8_line(name: str, validation: dict) -> str:
    """The export's line on the INT8 file."""
    if not validation["images"]:
        return f"{name}: INT8 no validation images (below the targets)"
    heatmaps = validation["heatmap_correlation"]
    return (f"{name}: INT8 {describe_fidelity(validation)}; accuracy FP32 {validation['fp32_accuracy']:.1%} "
            f"-> INT8 {validation['int8_accuracy']:.1%} on {validation['images']} validation images"
            + ("" if heatmaps is None else f", heatmap correlation {heatmaps:.3f}")
            + ("" if INT8_TARGETS.met(validation) else " (below the targets)"))


def float_layer_report(result, ranked: dict | None, sensitivity_file: str) -> dict:
    """The INT8 report's record of the layers kept float32, why, and the search that chose them."""
    if result is None:
        return {"float_layers": [], "search": None}
    alone = {r["layer"]: r for r in ranked["layers"]}
    return {
        "float_layers": [{"layer": layer, "sensitivity_rank": alone[layer]["rank"],
                          "alone_float": {k: v for k, v in alone[layer].items() if k not in ("layer", "rank")}}
                         for layer in result.float_layers],
        "search": {"sensitivity_file": sensitivity_file, "met_targets": result.met,
                   "all_int8": result.all_int8, "final": result.final, "steps": result.steps},
    }


def export_one(name: str, run_dir: Path, out_dir: Path, opset: int, quantize: str | None = None,
               member: Member | None = None, search: str = "auto",
               abstain_accuracy: float = DEFAULT_TARGET_ACCURACY) -> list[dict]:
    """Manifest entries: the FP32 file's, then (with ``quantize``) the INT8 file's."""
    member = member or Member(None, 0)
    ckpt_path = RunLayout(run_dir).member_files(name, member).best_checkpoint
    ckpt = checkpoint.load(ckpt_path)
    ckpt_sha256 = sha256_of(ckpt_path)
    model = checkpoint.rebuild_model(ckpt, expected_architecture=name)
    out_path = out_dir / f"{name}.onnx"
    tmp = export_model(ckpt, ckpt_sha256, out_path, opset, member.training_run, abstain_accuracy)
    try:
        images, _ = validation_images(run_dir, checkpoint.preprocessing_of(ckpt), member=member)
        report = check_parity(model, create_session(tmp), images, temperature=temperature_of(ckpt))
        print(f"{name}: parity {report.summary()}", flush=True)
        write_json(out_dir / f"{name}.parity.json", {"model": name, **report.as_dict()})
        if not report.passed:
            raise ExportError(f"{name}: parity check failed ({report.summary()})")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    from serve.predictor import Predictor

    meta = Predictor(out_path).metadata
    entry = {
        "name": name, "file": out_path.name, "precision": "fp32",
        **{k: meta[k] for k in ("display_name", "architecture", "training_run", "checkpoint_sha256",
                                "torch_version", "onnx_version", "exported_at")},
        "architecture_spec": json.loads(meta["architecture_spec"]),
        "class_names": json.loads(meta["class_names"]),
        "preprocessing": Preprocessing.from_metadata(meta).to_dict(),
        "outputs": {"logits": "N x classes", "probabilities": "N x classes, softmax(logits / temperature)",
                    "heatmaps": f"N x classes x {' x '.join(map(str, json.loads(meta['heatmap_size'])))}"},
        "heatmap_layer": meta["heatmap_layer"], "heatmap_size": json.loads(meta["heatmap_size"]),
        "val_accuracy": float(meta["val_accuracy"]),
        "size_bytes": out_path.stat().st_size, "sha256": sha256_of(out_path),
        "parity": report.as_dict(),
        "calibration": {"temperature": float(meta["temperature"]),
                        **{k: float(meta[k]) for k in CALIBRATION_KEYS if k in meta}},
    }
    if "abstain_threshold" in meta:
        print(f"{name}: temperature {float(meta['temperature']):.3f}, validation ECE "
              f"{float(meta['val_ece_before']):.3f} -> {float(meta['val_ece_after']):.3f}; unsure below "
              f"{float(meta['abstain_threshold']):.3f} (keeps {float(meta['abstain_val_coverage']):.0%} of "
              f"validation for {float(meta['abstain_target_accuracy']):.0%} accuracy)", flush=True)
    else:
        print(f"{name}: no temperature in the checkpoint (trained before calibration): plain softmax, "
              "no abstention threshold", flush=True)
    return [entry] + ([quantize_one(entry, ckpt, ckpt_sha256, run_dir, out_dir, member, search,
                                    abstain_accuracy)] if quantize else [])


def main(argv=None) -> int:
    return run_cli(lambda: export(parse_args(argv)))


def export(args: argparse.Namespace) -> int:
    run_dir = Path(args.run) if args.run else newest_run(RUNS_DIR)
    if not run_dir.is_dir():
        raise UserError(f"run folder '{run_dir}' does not exist")
    study, layout = study_of(run_dir), RunLayout(run_dir)
    chosen = {n: choose_member(run_dir, n, study, args.seed, args.fold) for n in MODEL_NAMES}
    available = [n for n in MODEL_NAMES if layout.member_files(n, chosen[n]).best_checkpoint.is_file()]
    names = [m.strip() for m in args.models.split(",")] if args.models else available
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise UserError(f"no best.pt for {', '.join(missing) or 'any model'} in '{run_dir}'")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"Exporting {', '.join(names)} from {run_dir} to {out_dir}/ (opset {args.opset})", flush=True)
    selection = {name: how_chosen(study, args.seed, args.fold) for name in names}
    for name in names:
        if chosen[name].label:
            print(f"{name}: the {chosen[name].label} run, {selection[name]}", flush=True)
    exported = [export_one(name, run_dir, out_dir, args.opset, args.quantize, chosen[name],
                          args.int8_search, args.abstain_accuracy) for name in names]
    # FP32 entries first: a reader that ignores "precision" still finds one file per model.
    entries = [e for per_model in exported for e in per_model if e["precision"] == "fp32"] + \
              [e for per_model in exported for e in per_model if e["precision"] != "fp32"]
    examples = copy_examples(run_dir, out_dir, chosen[names[0]])
    manifest = {"run": str(run_dir), "models": entries, "examples": examples, "selection": selection,
                "check_images": copy_check_images(run_dir, out_dir, chosen[names[0]])}
    write_json(out_dir / "manifest.json", manifest)
    model_card.write(out_dir / "README.md", manifest, run_dir)
    print(f"Wrote {len(entries)} model(s), {len(examples)} example image(s), "
          f"{out_dir / 'manifest.json'} and the model card {out_dir / 'README.md'}", flush=True)
    if args.triton:
        folders = write_repository(out_dir, Path(args.triton))
        print(f"Wrote the Triton model repository {args.triton}/: "
              + ", ".join(f.name for f in folders), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

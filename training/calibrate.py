"""After training: temperature scaling fitted on validation, the abstention threshold, and the
logits of held-out out-of-distribution images.

- ``calibration_record``: from the best weights' validation logits, the temperature (minimum
  NLL, see common.calibration), ECE and NLL before and after, and the threshold on the
  calibrated top probability that keeps predictions at the target accuracy. best.pt stores it
  (with each validation image's calibrated top probability and correctness, so an export can
  choose the threshold for another target without the images); report.json its summary.
- ``OutOfDistribution``: images of none of the classes (the built-in set beside the built-in
  dataset, or ``--ood-data FOLDER``), checked to share no file with the data trained on; their
  logits per model go to ``ood.csv`` for the comparison. Nothing is fitted on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import imaging
from common import calibration
from common.files import files_under
from common.run_layout import Member, RunLayout
from training import checkpoint, reports
from training.config import ConfigError, TrainConfig
from training.engine import Precision
from training.synthetic import ensure_builtin_ood
from training.transforms import EvalTransform, pixel_tensor

MAX_OOD_IMAGES = 1000  # the first this many (in name order) of a large --ood-data folder
ARRAYS = ("val_confidence", "val_correct")  # kept in best.pt, left out of report.json


def calibration_record(logits, labels, target: float = calibration.DEFAULT_TARGET_ACCURACY) -> dict:
    """Temperature, calibration before and after, and the abstention threshold, on validation."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    temperature = calibration.fit_temperature(logits, labels)
    before, after = calibration.softmax(logits), calibration.softmax(logits, temperature)
    correct = calibration.correctness(after, labels)  # T > 0 keeps every argmax
    confidence = calibration.top_confidence(after)
    return {
        "method": "temperature scaling, NLL minimised on the validation split",
        "temperature": temperature, "bins": calibration.BINS, "images": len(labels),
        "val_ece_before": calibration.ece(calibration.top_confidence(before), correct),
        "val_ece_after": calibration.ece(confidence, correct),
        "val_nll_before": calibration.nll(before, labels),
        "val_nll_after": calibration.nll(after, labels),
        "abstain": calibration.abstention_threshold(confidence, correct, target).as_dict(),
        "val_confidence": confidence.tolist(), "val_correct": correct.tolist(),
    }


def summary(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ARRAYS}


def describe(record: dict) -> str:
    t = record["abstain"]
    return (f"temperature {record['temperature']:.3f}: validation ECE {record['val_ece_before']:.3f} -> "
            f"{record['val_ece_after']:.3f}, NLL {record['val_nll_before']:.3f} -> {record['val_nll_after']:.3f}; "
            f"unsure below {t['threshold']:.3f} (keeps {t['coverage']:.0%} of validation"
            + (f" at {t['accuracy']:.1%} accuracy)" if t["reached"] else f", {t['target_accuracy']:.0%} not reached)"))


@dataclass
class OutOfDistribution:
    folder: Path
    paths: list[str]
    images: torch.Tensor  # N x 3 x H x W uint8, the evaluation pixels


def ood_folder(config: TrainConfig) -> Path | None:
    """--ood-data, else for the built-in dataset its held-out set, else none."""
    if config.ood_data:
        return Path(config.ood_data)
    return ensure_builtin_ood() if config.builtin_data else None


def load_ood(config: TrainConfig, trained_on: list[str], preprocessing) -> OutOfDistribution | None:
    """The out-of-distribution images, decoded; refused when they overlap the data."""
    folder = ood_folder(config)
    if folder is None:
        return None
    if not folder.is_dir():
        raise ConfigError(f"--ood-data '{folder}' is not a folder")
    data = Path(config.data).resolve()
    here = folder.resolve()
    if here == data or data in here.parents or here in data.parents:
        raise ConfigError(f"--ood-data '{folder}' overlaps the data folder '{config.data}'; "
                          "out-of-distribution images must be kept apart from the classes")
    paths = [str(p) for p in files_under(folder) if imaging.is_image_name(p.name)][:MAX_OOD_IMAGES]
    shared = {str(Path(p).resolve()) for p in trained_on} & {str(Path(p).resolve()) for p in paths}
    if shared:
        raise ConfigError(f"--ood-data '{folder}' holds {len(shared)} file(s) of the data, e.g. "
                          f"'{sorted(shared)[0]}'")
    kept, tensors = [], []
    for p in paths:
        try:
            tensors.append(pixel_tensor(p, preprocessing))
        except (OSError, ValueError):  # an unreadable file is simply not part of the check
            continue
        kept.append(p)
    if not kept:
        raise ConfigError(f"--ood-data '{folder}' has no readable images")
    return OutOfDistribution(folder, kept, torch.stack(tensors))


@torch.no_grad()
def ood_logits(model: torch.nn.Module, ood: OutOfDistribution, preprocessing, precision: Precision,
               device: torch.device, batch_size: int = 100) -> np.ndarray:
    model.eval().to(device)
    transform, out = EvalTransform(preprocessing), []
    for start in range(0, len(ood.paths), batch_size):
        images = precision.layout(transform(ood.images[start:start + batch_size]).to(device))
        with precision.autocast():
            out.append(model(images).float().cpu())
    return torch.cat(out).numpy()


def write_ood_logits(run_dir: Path, models: list[str], study: list[Member], ood: OutOfDistribution,
                     preprocessing, precision: Precision, device: torch.device) -> None:
    """``ood.csv`` beside each run's best.pt: the raw logits of every out-of-distribution image."""
    for member in study:
        for name in models:
            files = RunLayout(run_dir).member_files(name, member)
            ckpt = checkpoint.load(files.best_checkpoint)
            logits = ood_logits(checkpoint.rebuild_model(ckpt), ood, preprocessing, precision, device)
            reports.write_logits(files.ood_logits, [("ood", p, "", row.tolist())
                                                    for p, row in zip(ood.paths, logits)],
                                 ckpt["class_names"])

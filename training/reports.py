"""What a run leaves for people: the history table, curves, per-image predictions and logits
(the metrics and the confusion-matrix picture: common.metrics, common.confusion_image)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.files import atomic_write, write_text  # noqa: E402

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def write_history(path: Path, history: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows({k: row[k] for k in HISTORY_COLUMNS} for row in history)
    write_text(path, text.getvalue())


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curves(path: Path, history: list[dict], title: str, best_epoch: int) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "o-", label="validation")
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


PREDICTION_COLUMNS = ("split", "path", "label", "predicted")


def write_predictions(path: Path, evaluated: dict, class_names: list[str]) -> None:
    """One row per evaluated image: split, path, true and predicted class, every class's
    probability (``prob_<class>``). ``evaluated``: {split: (SplitImages, Evaluation)}."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([*PREDICTION_COLUMNS, *(f"prob_{c}" for c in class_names)])
    for split, (images, result) in evaluated.items():
        for row, image_path in enumerate(images.paths):
            writer.writerow([split, image_path, class_names[int(result.labels[row])],
                             class_names[int(result.predictions[row])],
                             *(f"{p:.6f}" for p in result.probabilities[row].tolist())])
    write_text(path, text.getvalue())


LOGIT_COLUMNS = ("split", "path", "label")


def write_logits(path: Path, rows: list[tuple[str, str, str, list[float]]], class_names: list[str]) -> None:
    """One row per image: split, path, true class ("" where there is none: out-of-distribution
    images) and every class's raw logit (``logit_<class>``), the numbers calibration is fitted
    and measured on (``predictions.csv`` rounds probabilities, which loses small ones)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([*LOGIT_COLUMNS, *(f"logit_{c}" for c in class_names)])
    for split, image_path, label, logits in rows:
        writer.writerow([split, image_path, label, *(f"{v:.7g}" for v in logits)])
    write_text(path, text.getvalue())


def read_logits(path: Path, class_names: list[str]) -> dict[str, dict]:
    """{split: {"paths", "labels" (class indices; -1 where none), "logits" (N x classes)}}."""
    out: dict[str, dict] = {}
    for row in read_predictions(path):
        split = out.setdefault(row["split"], {"paths": [], "labels": [], "logits": []})
        split["paths"].append(row["path"])
        split["labels"].append(class_names.index(row["label"]) if row["label"] else -1)
        split["logits"].append([float(row[f"logit_{c}"]) for c in class_names])
    return {k: {"paths": v["paths"], "labels": np.asarray(v["labels"], np.int64),
                "logits": np.asarray(v["logits"], np.float64).reshape(len(v["paths"]), len(class_names))}
            for k, v in out.items()}


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))

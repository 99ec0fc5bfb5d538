"""``heatmaps.png``: where each model looks, on a few validation images of every class.

A row per image (a few per class, chosen by the run's seed), a column per model: the image
with that model's Grad-CAM heatmap of its top class and the class it predicts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import imaging
from common.run_layout import Member, RunLayout
from imaging.heatmap import overlay
from training import checkpoint
from training.reports import plt, save_figure
from training.study import split_lists
from training.transforms import EvalTransform, pixel_tensor

IMAGES_PER_CLASS = 2


def chosen_images(run_dir: Path, member: Member, class_count: int, seed: int) -> list[tuple[str, int]]:
    """A few validation images of every class, the same for every model."""
    val = split_lists(run_dir, member)["val"]
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(class_count):
        members = [row for row in val if row[1] == label]
        picks = rng.choice(len(members), size=min(IMAGES_PER_CLASS, len(members)), replace=False) if members else []
        chosen += [tuple(members[i]) for i in sorted(picks)]
    return chosen


def write_heatmaps(run_dir: Path, models: list[str], member: Member, class_names: list[str], seed: int) -> Path:
    rows = chosen_images(run_dir, member, len(class_names), seed)
    images = [imaging.load_rgb(path) for path, _ in rows]
    layout, cells = RunLayout(run_dir), {}
    for name in models:
        ckpt = checkpoint.load(layout.member_files(name, member).best_checkpoint)
        model, spec = checkpoint.rebuild_model(ckpt), checkpoint.preprocessing_of(ckpt)
        batch = torch.stack([EvalTransform(spec)(pixel_tensor(img, spec)) for img in images])
        with torch.no_grad():
            logits, heatmaps = model.classify_and_explain(batch)
        top = logits.argmax(1)
        cells[name] = (ckpt, [(int(t), float(torch.softmax(row, 0)[t]), heatmaps[i, t].numpy())
                              for i, (row, t) in enumerate(zip(logits, top))])
    fig, axes = plt.subplots(len(rows), len(models) + 1, squeeze=False,
                             figsize=(2.1 * (len(models) + 1), 2.2 * len(rows) + 0.5))
    for r, ((_, label), image) in enumerate(zip(rows, images)):
        thumb = image.copy()
        thumb.thumbnail((160, 160))
        axes[r, 0].imshow(np.asarray(thumb))
        axes[r, 0].set_title(f"true: {class_names[label]}", fontsize=8)
        for c, name in enumerate(models, start=1):
            ckpt, predictions = cells[name]
            top, probability, heatmap = predictions[r]
            axes[r, c].imshow(np.asarray(overlay(thumb, heatmap)))
            colour = "black" if top == label else "red"
            header = f"{checkpoint.architecture_of(ckpt).display_name}\n" if r == 0 else ""
            axes[r, c].set_title(f"{header}{class_names[top]} ({probability:.0%})", fontsize=8, color=colour)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    where = f" ({member.label})" if member.label else ""
    fig.suptitle(f"Where each model looks{where}: Grad-CAM of its top class on layer4; red: wrong", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    path = layout.heatmaps_png
    save_figure(fig, path)
    return path

"""Which runs a study trains: one per model, or per model and seed (``--seeds``) or fold (``--folds``).

Every run keeps its own folder, ``runs/<run>/<model>/`` for a single run, else
``runs/<run>/<model>/seed-<s>/`` or ``runs/<run>/<model>/fold-<k>/``, with the same files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainConfig


@dataclass(frozen=True)
class Member:
    """One training run of every model: its seed, and its fold of the cross-validation."""

    label: str | None  # folder name under each model; None: a single run, the model folder itself
    seed: int
    fold: int | None = None  # 0-based; the folder says fold-<fold + 1>

    def folder(self, run_dir: Path, model: str) -> Path:
        return run_dir / model if self.label is None else run_dir / model / self.label


def members(config: TrainConfig) -> list[Member]:
    if config.folds:
        return [Member(f"fold-{k + 1}", config.seed, k) for k in range(config.folds)]
    if config.seeds > 1:
        return [Member(f"seed-{s}", s) for s in range(config.seed, config.seed + config.seeds)]
    return [Member(None, config.seed)]


def run_members(run_dir: Path) -> list[Member]:
    """The members of a finished or started run, from its config.json."""
    from training.config import from_dict

    return members(from_dict(json.loads((Path(run_dir) / "config.json").read_text())))


def split_lists(run_dir: Path, member: Member) -> dict[str, list]:
    """The member's splits as listed in the run's splits.json: {split: [[path, label], ...]}."""
    listed = json.loads((Path(run_dir) / "splits.json").read_text())
    if member.fold is None:
        return {k: v for k, v in listed.items() if k in ("train", "val", "test")}
    folds = listed["folds"]
    out = {"train": [row for k, fold in enumerate(folds) if k != member.fold for row in fold],
           "val": folds[member.fold]}
    if "test" in listed:
        out["test"] = listed["test"]
    return out

"""Which runs a study trains: one per model, or per model and seed (``--seeds``) or fold
(``--folds``); each run's folder is common/run_layout.py's."""
from __future__ import annotations

import json
from pathlib import Path

from common.run_layout import Member, RunLayout
from training.config import TrainConfig, from_dict


def members(config: TrainConfig) -> list[Member]:
    if config.folds:
        return [Member.of_fold(k, config.seed) for k in range(config.folds)]
    if config.seeds > 1:
        return [Member.of_seed(s) for s in range(config.seed, config.seed + config.seeds)]
    return [Member(None, config.seed)]


def run_members(run_dir: Path) -> list[Member]:
    """The members of a finished or started run, from its config.json."""
    return members(from_dict(json.loads(RunLayout(run_dir).config.read_text())))


def split_lists(run_dir: Path, member: Member) -> dict[str, list]:
    """The member's splits as listed in the run's splits.json: {split: [[path, label], ...]}."""
    listed = json.loads(RunLayout(run_dir).splits.read_text())
    if member.fold is None:
        return {k: v for k, v in listed.items() if k in ("train", "val", "test")}
    folds = listed["folds"]
    out = {"train": [row for k, fold in enumerate(folds) if k != member.fold for row in fold],
           "val": folds[member.fold]}
    if "test" in listed:
        out["test"] = listed["test"]
    return out

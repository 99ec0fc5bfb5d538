"""Self-describing checkpoints, written atomically and loaded with ``weights_only=True``.

``best.pt`` holds the model and everything needed to rebuild and feed it (architecture, class
names, input size, mean, std); ``last.pt`` adds the optimizer, scheduler, RNG states and
history needed to continue a stopped run exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from training.models import ARCHITECTURES, create_model

FORMAT_VERSION = 1
MODEL_FIELDS = ("architecture", "class_names", "image_size", "mean", "std", "model_state")


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with a one-line reason."""


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint '{path}': {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{path}' is not a checkpoint of this project")
    return ckpt


def model_record(architecture: str, model: torch.nn.Module, class_names: list[str],
                 image_size: tuple[int, int], mean, std) -> dict:
    """The self-describing part every checkpoint carries."""
    return {
        "format": FORMAT_VERSION,
        "architecture": architecture,
        "class_names": list(class_names),
        "image_size": list(image_size),
        "mean": list(mean),
        "std": list(std),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def rebuild_model(ckpt: dict, expected_architecture: str | None = None) -> torch.nn.Module:
    """Recreate the model (in eval mode) from a checkpoint alone."""
    missing = [f for f in MODEL_FIELDS if f not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint lacks field(s): {', '.join(missing)}")
    arch = ckpt["architecture"]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint names an unknown architecture {arch!r}")
    if expected_architecture and arch != expected_architecture:
        raise CheckpointError(
            f"checkpoint holds a {arch} model, not {expected_architecture}"
        )
    model = create_model(arch, len(ckpt["class_names"]))
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights do not fit the {arch} architecture: {str(exc).splitlines()[0]}"
        ) from None
    return model.eval()

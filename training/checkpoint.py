"""Self-describing checkpoints, written atomically and loaded with ``weights_only=True``.

``best.pt`` holds the weights and everything needed to rebuild and feed them: the registry
name, the architecture spec itself, the class names and the preprocessing spec (with
``--ema-decay``, the weights are the moving average's); ``last.pt`` holds the trained weights
and adds the optimizer, scheduler, moving average (``ema_state``), RNG states and history needed
to continue a stopped run exactly.

Format versions: 2 stores the architecture and preprocessing specs; 1 (older files) stored the
registry name, image size, mean and std, and still loads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.errors import UserError
from common.files import atomic_write
from imaging.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from training.models import ARCHITECTURES, Architecture, create_model

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MODEL_FIELDS = {1: ("architecture", "class_names", "image_size", "mean", "std", "model_state"),
                2: ("architecture", "architecture_spec", "class_names", "preprocessing", "model_state")}


class CheckpointError(UserError):
    """A checkpoint that cannot be used, with a one-line reason."""


def save(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def read_weights_file(path: Path, what: str = "checkpoint"):
    """``torch.load`` of tensors only (no code runs), its failures as one line naming ``what``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} '{path}' does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {what} '{path}': {str(exc).splitlines()[0]}") from None


def load(path: Path) -> dict:
    ckpt = read_weights_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{path}' is not a checkpoint of this project")
    return ckpt


def model_record(name: str, model: torch.nn.Module, class_names: list[str],
                 preprocessing: Preprocessing) -> dict:
    """The self-describing part every checkpoint carries (``model.arch`` is its spec)."""
    return {
        "format": FORMAT_VERSION,
        "architecture": name,
        "architecture_spec": model.arch.to_dict(),
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def _check_format(ckpt: dict) -> int:
    version = ckpt.get("format", 1)
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"checkpoint format {version!r} is not one this version reads "
                              f"({', '.join(map(str, READABLE_FORMATS))}); update the project")
    missing = [f for f in MODEL_FIELDS[version] if f not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint lacks field(s): {', '.join(missing)}")
    return version


def architecture_of(ckpt: dict) -> Architecture:
    """The spec the checkpoint was trained as (format 1: the registry's entry of its name)."""
    if _check_format(ckpt) == 1:
        if ckpt["architecture"] not in ARCHITECTURES:
            raise CheckpointError(f"checkpoint names an unknown architecture {ckpt['architecture']!r}")
        return ARCHITECTURES[ckpt["architecture"]]
    try:
        return Architecture.from_dict(ckpt["architecture_spec"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint has an unusable architecture spec: {exc}") from None


def preprocessing_of(ckpt: dict) -> Preprocessing:
    """The evaluation preprocessing the checkpoint's model was validated with."""
    try:
        if _check_format(ckpt) == 1:
            return Preprocessing(input_size=tuple(ckpt["image_size"]),
                                 mean=tuple(ckpt.get("mean", IMAGENET_MEAN)),
                                 std=tuple(ckpt.get("std", IMAGENET_STD)))
        return Preprocessing.from_dict(ckpt["preprocessing"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint has an unusable preprocessing spec: {exc}") from None


def rebuild_model(ckpt: dict, expected_architecture: str | None = None) -> torch.nn.Module:
    """Recreate the model (in eval mode) from a checkpoint alone."""
    arch = architecture_of(ckpt)
    name = ckpt["architecture"]
    if expected_architecture and name != expected_architecture:
        raise CheckpointError(f"checkpoint holds a {name} model, not {expected_architecture}")
    model = create_model(arch, len(ckpt["class_names"]))
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights do not fit the {name} architecture: {str(exc).splitlines()[0]}"
        ) from None
    return model.eval()

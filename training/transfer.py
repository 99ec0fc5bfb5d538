"""Transfer learning from a local torchvision ResNet-34 state dict (nothing is downloaded).

All three architectures use torchvision's module names, so ImageNet weights load by name
wherever the shapes match: the stem and every convolution and BatchNorm layer. The
Squeeze-and-Excitation blocks and the classifier heads have no counterpart and start fresh.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from training.checkpoint import CheckpointError, read_weights_file
from training.models import create_model

# Below this share of the model's backbone tensors, the file is not a ResNet-34 state dict.
MIN_MATCHED_SHARE = 0.5


def _read_state_dict(path: Path) -> dict:
    state = read_weights_file(path, "init weights file")
    for key in ("state_dict", "model_state", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors")
    return state


def pretrained_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters with a torchvision ResNet-34 counterpart: all but the SE blocks and the head."""
    head = model.head_parameter_names()
    return {n for n, _ in model.named_parameters() if n not in head and ".se." not in n}


def matching_tensors(source: dict, model: torch.nn.Module, path) -> dict:
    """The file's tensors that fit the model by name and shape (never the head).

    Raises CheckpointError when they cover too little of the backbone to be a ResNet-34.
    """
    target = model.state_dict()
    head = {n for n in target if n.startswith("fc.")}
    loaded = {
        name: tensor for name, tensor in source.items()
        if name in target and name not in head and tensor.shape == target[name].shape
    }
    backbone = [n for n in target if n not in head]
    if len(loaded) < MIN_MATCHED_SHARE * len(backbone):
        raise CheckpointError(
            f"'{path}' matches only {len(loaded)} of the model's {len(backbone)} backbone tensors; "
            "expected a torchvision ResNet-34 state dict"
        )
    return loaded


def check_init_weights(path: str | Path, model_names, num_classes: int) -> None:
    """Refuse an unusable file before any training starts (shapes only: meta tensors)."""
    source = _read_state_dict(Path(path))
    for name in model_names:
        with torch.device("meta"):
            model = create_model(name, num_classes)
        matching_tensors(source, model, path)


def load_init_weights(model: torch.nn.Module, path: str | Path, verbose: bool = True) -> list[str]:
    """Copy every tensor whose name and shape match (heads excluded); returns the names loaded."""
    source = _read_state_dict(Path(path))
    loaded = matching_tensors(source, model, path)
    model.load_state_dict(loaded, strict=False)
    if verbose:
        target = model.state_dict()
        fresh = [n for n in target if n not in loaded]
        unused = [n for n in source if n not in loaded]
        print(f"Init weights: loaded {len(loaded)} of {len(target)} tensors from {path}; "
              f"{len(fresh)} start fresh ({_summarise(fresh)}); "
              f"{len(unused)} in the file not used ({_summarise(unused)})", flush=True)
    return sorted(loaded)


def _summarise(names: list[str]) -> str:
    """Names with block indices folded: 'layer*.*.se.fc1.weight x16' instead of 16 names."""
    if not names:
        return "none"
    counts: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"^layer\d+\.\d+\.", "layer*.*.", name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(p if n == 1 else f"{p} x{n}" for p, n in counts.items())


class BackboneFreezer:
    """Train only what did not come from the weights file (the head, SE blocks) for the
    first ``epochs`` epochs, then everything.

    BatchNorm layers stay in training mode: their running statistics adapt to the new data
    while their weights are frozen.
    """

    def __init__(self, model: torch.nn.Module, epochs: int):
        self.epochs = epochs
        pretrained = pretrained_parameter_names(model)
        # Only parameters that train at all (Plain-34's unused projections stay frozen).
        self.backbone = [p for n, p in model.named_parameters() if n in pretrained and p.requires_grad]

    def apply(self, epoch: int) -> bool:
        """Freeze or unfreeze for this epoch; True when the set of trained parameters changed."""
        if not self.epochs or not self.backbone:
            return False
        trainable = epoch > self.epochs
        changed = self.backbone[0].requires_grad != trainable
        for p in self.backbone:
            p.requires_grad_(trainable)
        return changed

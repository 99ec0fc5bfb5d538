"""Transfer learning from a local torchvision ResNet-34 state dict (nothing is downloaded).

All three architectures use torchvision's module names, so ImageNet weights load by name
wherever the shapes match: the stem and every convolution and BatchNorm layer. The
Squeeze-and-Excitation blocks and the classifier heads have no counterpart and start fresh.
"""
from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import CheckpointError

# Below this share of the model's backbone tensors, the file is not a ResNet-34 state dict.
MIN_MATCHED_SHARE = 0.5


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"init weights file '{path}' does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read init weights '{path}': {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model_state", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors")
    return state


def load_init_weights(model: torch.nn.Module, path: str | Path, verbose: bool = True) -> list[str]:
    """Copy every tensor whose name and shape match (heads excluded); returns the names loaded."""
    source = _read_state_dict(Path(path))
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
    model.load_state_dict(loaded, strict=False)
    if verbose:
        fresh = [n for n in target if n not in loaded]
        unused = [n for n in source if n not in loaded]
        print(f"Init weights: loaded {len(loaded)} of {len(target)} tensors from {path}; "
              f"{len(fresh)} start fresh ({_summarise(fresh)}); "
              f"{len(unused)} in the file not used ({_summarise(unused)})", flush=True)
    return sorted(loaded)


def _summarise(names: list[str], limit: int = 4) -> str:
    if not names:
        return "none"
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class BackboneFreezer:
    """Train only the head for the first ``epochs`` epochs, then everything."""

    def __init__(self, model: torch.nn.Module, epochs: int):
        self.epochs = epochs
        head = model.head_parameter_names()
        # Only parameters that train at all (Plain-34's unused projections stay frozen).
        self.backbone = [p for n, p in model.named_parameters() if n not in head and p.requires_grad]

    def apply(self, epoch: int) -> None:
        if self.epochs:
            for p in self.backbone:
                p.requires_grad_(epoch > self.epochs)

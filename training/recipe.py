"""The optimisation recipe built from a config: optimizer, learning-rate schedule, loss, batch
mixing and the moving average of the weights.

One module builds them for the trainer, ``benchmarks/`` and the tests, so they all train with
the recipe a run records in its ``config.json``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2

from training.config import TrainConfig


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: lr_scheduler.LRScheduler  # stepped once per epoch
    criterion: nn.Module  # takes class indices or (mixed) class probabilities as targets

    def state_dict(self) -> dict:
        return {"optimizer_state": self.optimizer.state_dict(),
                "scheduler_state": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])


def build_optimization(model: nn.Module, config: TrainConfig) -> Optimization:
    """AdamW, the schedule (``build_scheduler``), label-smoothed cross-entropy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return Optimization(optimizer, build_scheduler(optimizer, config), criterion)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> lr_scheduler.LRScheduler:
    """Stepped once per epoch. Epochs 1..W of a warm-up train at lr * k / (W + 1), rising
    linearly towards lr; then "step" multiplies lr by gamma every step_size epochs, and "cosine"
    decays it from lr (the first epoch after the warm-up) along half a cosine that would reach
    0 one epoch after the last."""
    warmup = config.warmup_epochs
    if config.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs - warmup, eta_min=0.0)
    else:
        main = lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    if not warmup:
        return main
    rise = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0,
                                 total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [rise, main], milestones=[warmup])


class BatchMix:
    """Mixes a share ``prob`` of the training batches with mixup or CutMix (one of them at
    random per batch); labels become class probabilities. The draws come from torch's global
    generator, which checkpoints save and resume restores."""

    def __init__(self, num_classes: int, prob: float, mixup_alpha: float, cutmix_alpha: float):
        ways = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []
        ways += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha else []
        self.prob, self.mix = prob, v2.RandomChoice(ways)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.rand(()).item() >= self.prob:
            return images, labels
        return self.mix(images, labels)


def build_mix(config: TrainConfig, num_classes: int) -> BatchMix | None:
    """The batch mixing of the recipe, or None when it mixes nothing (mix_prob 0)."""
    if not config.mix_prob:
        return None
    return BatchMix(num_classes, config.mix_prob, config.mixup_alpha, config.cutmix_alpha)


def ema_decay_with_warmup(decay: float, num_averaged: int) -> float:
    """The decay of the ``num_averaged``-th update: min(decay, (1 + n) / (10 + n)).

    A plain EMA at 0.999 remembers about 1000 steps, and a small dataset's whole run may be
    shorter: the average would still be mostly the random initial weights. The warm-up
    (TensorFlow's ExponentialMovingAverage ``num_updates`` rule; timm's ModelEmaV3 warms up
    likewise) weights the newest step by at least 9 / (10 + n), so early on the average follows
    the model, and the decay reaches ``decay`` only once the run is long enough to use it.
    """
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def build_ema(model: nn.Module, config: TrainConfig) -> AveragedModel | None:
    """The exponential moving average of the weights and BatchNorm statistics (None when
    ema_decay is 0), updated after each optimizer step with ``update_parameters(model)``."""
    if not config.ema_decay:
        return None

    def update(averaged, current, num_averaged):
        decay = ema_decay_with_warmup(config.ema_decay, int(num_averaged))
        get_ema_multi_avg_fn(decay)(averaged, current, num_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)

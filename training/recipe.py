"""The optimisation recipe built from a config: optimizer, learning-rate schedule and loss.

One function builds them for the trainer, ``benchmarks/train.py`` and the tests, so they all
train with the recipe a run records in its ``config.json``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.config import TrainConfig


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per epoch
    criterion: nn.Module

    def state_dict(self) -> dict:
        return {"optimizer_state": self.optimizer.state_dict(),
                "scheduler_state": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])


def build_optimization(model: nn.Module, config: TrainConfig) -> Optimization:
    """AdamW, StepLR (every ``step_size`` epochs times ``gamma``), label-smoothed cross-entropy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return Optimization(optimizer, scheduler, criterion)

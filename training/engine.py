"""One epoch of training, one pass of evaluation, and early stopping."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from common.cpu import cpu_flags
from training import distributed
from training.data import SplitImages
from training.distributed import World


class EarlyStopping:
    """Counts epochs *without* an improvement of validation loss by at least ``min_delta``."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True when it is a new best."""
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


NATIVE_BFLOAT16 = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags


def native_bfloat16() -> bool:
    """Whether this CPU multiplies in bfloat16 natively (AVX-512 BF16 or AMX). Elsewhere
    PyTorch emulates bfloat16 on the CPU, slower than float32 (benchmarks/cpu_precision.py)."""
    return bool(NATIVE_BFLOAT16 & cpu_flags())


@dataclass
class Precision:
    """Mixed precision where it pays (``mode`` auto): bfloat16 autocast on CUDA (float16 with
    loss scaling where bfloat16 is missing) and on CPUs with native bfloat16; float32 elsewhere.
    ``mode`` float32 or bfloat16 forces one. channels_last goes with reduced precision, where
    its kernels are the fast ones (on CPUs in float32 it was slower: benchmarks/README.md)."""

    device: torch.device
    mode: str = "auto"

    def __post_init__(self):
        cuda, cpu = self.device.type == "cuda", self.device.type == "cpu"
        if cuda and self.mode != "bfloat16":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.bfloat16
        auto = cuda or (cpu and native_bfloat16())
        self.enabled = (cuda or cpu) and (self.mode == "bfloat16" or (self.mode == "auto" and auto))
        self.channels_last = cuda or self.enabled
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.enabled and self.dtype == torch.float16)

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def chosen(self) -> str:
        """What was chosen and why, in one line: "bfloat16 autocast + channels_last: this CPU
        has avx512_bf16"."""
        dtype = str(self.dtype).removeprefix("torch.")
        what = f"{dtype} autocast" + (" with loss scaling" if self.scaler.is_enabled() else "") \
            if self.enabled else "float32"
        what += " + channels_last" if self.channels_last else " + contiguous layout"
        kind = self.device.type
        if kind not in ("cuda", "cpu") and self.mode != "float32":
            why = f"autocast runs on cuda and cpu only, not {kind}"
        elif self.mode != "auto":
            why = f"--precision {self.mode}"
        elif kind == "cuda":
            why = f"this GPU {'has' if self.dtype == torch.bfloat16 else 'lacks'} bfloat16"
        else:
            native = sorted(NATIVE_BFLOAT16 & cpu_flags())
            why = f"this CPU has {' and '.join(native)}" if native else \
                "this CPU has no native bfloat16 (avx512_bf16, amx_bf16), so float32 is faster"
        return f"{what}: {why}"

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.") if self.enabled else "float32"
        return f"{dtype} on {self.device.type}" + (", channels_last" if self.channels_last else "")

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the memory layout the model is in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def train_one_epoch(model: nn.Module, loader, criterion, optimizer, precision: Precision,
                    device: torch.device, world: World, desc: str, mix=None,
                    ema: AveragedModel | None = None) -> tuple[float, float]:
    """Returns (mean loss, accuracy) over every training sample of every rank.

    ``mix(images, labels)`` (training.recipe.BatchMix) may mix a batch on the device, turning
    its labels into class probabilities; accuracy then counts a prediction of the class with
    the largest share as right. ``ema`` is updated after every optimizer step.
    """
    model.train()
    loss_sum = correct = count = 0.0
    bar = tqdm(loader, desc=desc, leave=False, disable=None if world.is_main else True)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mix is not None:
            images, labels = mix(images, labels)
        images = precision.layout(images)  # after mixing, which returns contiguous tensors
        with precision.autocast():
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        n = len(labels)
        loss_sum += loss.item() * n
        classes = labels.argmax(1) if labels.dim() > 1 else labels
        correct += (logits.argmax(1) == classes).sum().item()
        count += n
        bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
    loss_sum, correct, count = distributed.all_sum([loss_sum, correct, count], world, device)
    return loss_sum / count, correct / count


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # top-1 class per sample, in the split's order
    labels: torch.Tensor
    probabilities: torch.Tensor  # N x classes, softmax, in the split's order
    logits: torch.Tensor | None = None  # N x classes, in the split's order (what calibration fits)


@torch.no_grad()
def evaluate(model: nn.Module, split: SplitImages, criterion, transform, precision: Precision,
             device: torch.device, world: World, batch_size: int = 100) -> Evaluation:
    """Evaluate a whole split; with several processes each takes a shard, results are joined."""
    model.eval()
    rows = torch.arange(world.rank, len(split), world.size)
    loss_sum, logits_kept = 0.0, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = precision.layout(transform(split.images[chunk]).to(device, non_blocking=True))
        labels = split.labels[chunk].to(device)
        with precision.autocast():
            logits = model(images)
        loss_sum += criterion(logits.float(), labels).item() * len(chunk)
        logits_kept.append(logits.float().cpu())
    if not logits_kept:  # a rank with no rows of a tiny split
        classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
        logits_kept = [torch.empty(0, classes)]
    all_logits = torch.cat(logits_kept)
    (loss_sum,) = distributed.all_sum([loss_sum], world, device)
    # Shards interleave (rank r holds rows r, r + size, ...): put them back in split order.
    gathered_rows = distributed.all_gather(rows, world)
    gathered = distributed.all_gather(all_logits, world)
    ordered = torch.empty_like(gathered)
    ordered[gathered_rows] = gathered
    probabilities = torch.softmax(ordered, 1)
    predictions = probabilities.argmax(1)
    accuracy = (predictions == split.labels).float().mean().item()
    return Evaluation(loss_sum / len(split), accuracy, predictions, split.labels.clone(), probabilities,
                      ordered)

"""Process-group helpers: one process without torchrun, several with it (DDP).

Launched by torchrun (RANK and WORLD_SIZE set), training uses DistributedDataParallel with
nccl on CUDA and gloo on CPU; otherwise these helpers are no-ops for a world of one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.config import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(preference: str, world: World) -> torch.device:
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", world.local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() and not world.distributed:
        return torch.device("mps")
    return torch.device("cpu")


def init(preference: str) -> tuple[World, torch.device]:
    """Join the process group if torchrun started us; pick this process's device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return World(), pick_device(preference, World())
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(preference, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return world, device


def local_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its CPU cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(obj, world: World):
    """Rank 0's value of a picklable object, on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP syncs buffers at the start of each forward pass, so after an epoch's last step every
    rank holds statistics updated by its own last batch. Evaluating (each rank a shard) must
    use the model rank 0 saves.
    """
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, world: World) -> list:
    """Every rank's value of a picklable object, in rank order."""
    if not world.distributed:
        return [obj]
    parts = [None] * world.size
    dist.all_gather_object(parts, obj)
    return parts


def all_gather(t: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order."""
    return torch.cat(all_gather_objects(t.cpu(), world)) if world.distributed else t

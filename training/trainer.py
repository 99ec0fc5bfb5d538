"""Train one model: the epoch loop with checkpoints, resume, early stopping and its reports."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from training import checkpoint, distributed, reports, transfer
from training.config import TrainConfig
from training.data import PreparedData, TrainingSamples
from training.distributed import World
from training.engine import EarlyStopping, Precision, evaluate, train_one_epoch
from training.models import ARCHITECTURES, count_mult_adds, count_parameters, create_model
from training.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainAugment


def default_workers() -> int:
    """Loader processes: images are decoded already, so a few suffice; none on tiny machines.
    Processes on one machine (torchrun) share its cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores //= distributed.local_size()
    return 0 if cores <= 2 else min(8, cores // 2)


class AugmentedBatches:
    """One epoch of training batches, augmented on the device the model trains on."""

    def __init__(self, loader: DataLoader, augment: TrainAugment, device: torch.device):
        self.loader, self.augment, self.device = loader, augment, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, parameters, labels in self.loader:
            yield self.augment(images.to(self.device, non_blocking=True), parameters), labels


def train_loader(data: PreparedData, config: TrainConfig, world: World, device: torch.device):
    """The training set, its sampler and the augmented batches of one epoch of it
    (benchmarks/train.py times this very loader)."""
    size = (config.image_size, config.image_size)
    augment = TrainAugment(size=size)
    train_set = TrainingSamples(data.splits["train"], augment, config.seed)
    sampler = DistributedSampler(train_set, num_replicas=world.size, rank=world.rank,
                                 shuffle=True, seed=config.seed)
    workers = default_workers() if config.workers < 0 else config.workers
    loader = DataLoader(
        train_set, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
        # BatchNorm1d in the modified head cannot train on a batch of one. (Every rank gets
        # the same number of samples, padded by repeating at most size - 1 of them.)
        drop_last=len(sampler) % config.batch_size == 1, pin_memory=device.type == "cuda",
    )
    return train_set, sampler, AugmentedBatches(loader, augment, device)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(saved, world: World, device: torch.device) -> bool:
    """Restore this rank's generators from a list of per-rank states; False if none fits."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != world.size:
        return False
    state = states[world.rank]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    return True


def _wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    if not world.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def train_model(name: str, config: TrainConfig, data: PreparedData, model_dir: Path,
                world: World, device: torch.device) -> dict:
    """Train (or continue training) one architecture; returns its report."""
    model_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = model_dir / "last.pt", model_dir / "best.pt"
    size = (config.image_size, config.image_size)
    display = ARCHITECTURES[name].display_name

    torch.manual_seed(config.seed)
    model = create_model(name, len(data.class_names))  # the same initial weights on every rank
    if world.rank:
        torch.manual_seed(config.seed + world.rank)  # but each rank its own dropout masks
    if config.init_weights and not last_path.exists():
        transfer.load_init_weights(model, config.init_weights, verbose=world.is_main)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    stopper = EarlyStopping(config.patience, config.min_delta)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    precision = Precision(device)
    history: list[dict] = []
    start_epoch, finished = 1, False

    if last_path.exists():
        state = checkpoint.load(last_path)
        if state.get("class_names") != data.class_names:
            raise checkpoint.CheckpointError(f"'{last_path}' was trained on other classes")
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        stopper.load_state_dict(state["early_stopping"])
        history, finished = state["history"], state["finished"]
        exact = _set_rng_state(state["rng"], world, device)
        start_epoch = state["epoch"] + 1
        if world.is_main:
            print(f"{display}: resuming after epoch {state['epoch']}"
                  + (" (already finished)" if finished else "")
                  + ("" if exact or finished else
                     f" with {world.size} process(es), not as before: random draws differ "
                     "from an uninterrupted run"), flush=True)

    freezer = transfer.BackboneFreezer(model, config.freeze_epochs)
    train_set, sampler, loader = train_loader(data, config, world, device)
    eval_transform = EvalTransform()

    trained = None
    for epoch in range(start_epoch, config.epochs + 1):
        if finished:
            break
        started = time.perf_counter()
        # DDP registers the parameters that need gradients when it wraps: wrap again when
        # freezing changes them.
        if freezer.apply(epoch) or trained is None:
            del trained
            trained = _wrap(model, world, device)
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(
            trained, loader, criterion, optimizer, precision, device, world,
            desc=f"{display} {epoch}/{config.epochs}",
        )
        scheduler.step()
        distributed.broadcast_buffers(model, world)
        val = evaluate(model, data.splits["val"], criterion, eval_transform, precision, device, world)
        improved = stopper.step(val.loss)
        history.append({
            "epoch": epoch, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val.loss, "val_accuracy": val.accuracy,
            "seconds": time.perf_counter() - started,
        })
        finished = stopper.should_stop or epoch == config.epochs
        rng = distributed.all_gather_objects(_rng_state(device), world)
        if world.is_main:
            record = checkpoint.model_record(name, model, data.class_names, size, IMAGENET_MEAN, IMAGENET_STD)
            if improved:
                checkpoint.save_atomic({**record, "epoch": epoch, "val_loss": val.loss,
                                        "val_accuracy": val.accuracy}, best_path)
            checkpoint.save_atomic({
                **record, "epoch": epoch, "finished": finished, "history": history,
                "optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
                "early_stopping": stopper.state_dict(), "rng": rng,
                "config": {k: v for k, v in vars(config).items() if v is not None},
            }, last_path)
            print(f"{display:>18} epoch {epoch:>2}/{config.epochs}  lr {lr:.1e}  "
                  f"train loss {train_loss:.4f} acc {train_acc:.4f}  "
                  f"val loss {val.loss:.4f} acc {val.accuracy:.4f}  "
                  f"{history[-1]['seconds']:.1f}s{'  *' if improved else ''}", flush=True)
            if stopper.should_stop:
                print(f"{display}: stopping early, {stopper.bad_epochs} epochs without improvement",
                      flush=True)
        if not (val.loss == val.loss):  # NaN
            raise RuntimeError(f"{display}: validation loss is NaN; training diverged (try a lower --lr)")

    distributed.barrier(world)
    if not best_path.exists():
        raise RuntimeError(f"{display}: no best checkpoint in {model_dir} (with several machines, "
                           "the run folder must be on storage they all share)")
    return _final_report(name, config, model, best_path, history, data, criterion,
                         eval_transform, precision, device, world, model_dir)


def _final_report(name, config, model, best_path, history, data, criterion, eval_transform,
                  precision, device, world, model_dir) -> dict:
    """Evaluate the best weights on val (and test) and write the model's report files."""
    best = checkpoint.load(best_path)
    model.load_state_dict(best["model_state"])
    best_row = next(row for row in history if row["epoch"] == best["epoch"])
    report = {
        "architecture": name,
        "display_name": ARCHITECTURES[name].display_name,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "train_loss": best_row["train_loss"],
        "train_accuracy": best_row["train_accuracy"],
    }
    for split in ("val", "test"):
        if split not in data.splits:
            continue
        result = evaluate(model, data.splits[split], criterion, eval_transform, precision, device, world)
        matrix = reports.confusion_matrix(result.labels, result.predictions, len(data.class_names))
        report[f"{split}_loss"], report[f"{split}_accuracy"] = result.loss, result.accuracy
        report["per_class" if split == "val" else "test_per_class"] = reports.per_class_metrics(
            matrix, data.class_names)
        if split == "val":
            val_matrix = matrix
    size = tuple(best["image_size"])
    report.update({
        "parameters": count_parameters(model),
        "mult_adds": count_mult_adds(model, size),
        "image_size": list(size),
        "class_names": data.class_names,
        "seconds": sum(row["seconds"] for row in history),
        "stopped_early": history[-1]["epoch"] < config.epochs,
    })
    if world.is_main:
        reports.write_history(model_dir / "history.csv", history)
        reports.plot_curves(model_dir / "curves.png", history, report["display_name"], report["best_epoch"])
        reports.plot_confusion(model_dir / "confusion.png", val_matrix, data.class_names,
                               f"{report['display_name']}: validation, best epoch {report['best_epoch']}")
        reports.write_json(model_dir / "report.json", report)
    return report

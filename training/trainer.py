"""Train one model: set up, resume, then per epoch train, evaluate, save, report.

``train_model`` reads top to bottom; each step is a function below it, acting on one
``ModelRun`` that holds everything a model's training needs.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler

from common import metrics
from common.confusion_image import draw_confusion
from common.cpu import usable_logical_cpus
from common.errors import Failure
from common.files import write_json
from common.run_layout import ModelFiles
from imaging.preprocessing import Preprocessing
from training import calibrate, checkpoint, distributed, reports, transfer
from training.config import TrainConfig, to_dict
from training.data import PreparedData, TrainingSamples
from training.distributed import World
from training.engine import EarlyStopping, Precision, evaluate, train_one_epoch
from training.models import count_mult_adds, count_parameters, create_model
from training.recipe import BatchMix, Optimization, build_ema, build_mix, build_optimization
from training.image_cache import default_cache_dir
from training.transforms import EvalTransform, TrainAugment, stored_size


def default_workers() -> int:
    """Loader processes: images are decoded already (each sample's crop is cut in the loader),
    so a few suffice; none on tiny machines.
    Processes on one machine (torchrun) share its cores."""
    cores = usable_logical_cpus() // distributed.local_size()
    return 0 if cores <= 2 else min(8, cores // 2)


def preprocessing_for(config: TrainConfig) -> Preprocessing:
    """The evaluation preprocessing a run trains for (recorded in every checkpoint)."""
    return Preprocessing(input_size=(config.image_size, config.image_size))


def train_storage_for(config: TrainConfig) -> Preprocessing:
    """How training copies are stored: the evaluation squash, larger (see stored_size)."""
    spec = preprocessing_for(config)
    return dataclasses.replace(spec, input_size=stored_size(spec.input_size, config.crop_scale))


def cache_dir_for(config: TrainConfig) -> Path | None:
    """Where decoded images are kept: None keeps them in memory (--no-cache)."""
    return None if config.no_cache else Path(config.cache_dir) if config.cache_dir else default_cache_dir()


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
    spec = preprocessing_for(config)
    augment = TrainAugment(size=spec.input_size, crop_scale=config.crop_scale, mean=spec.mean, std=spec.std)
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


@dataclass
class ModelRun:
    """One architecture's training: its settings, model, recipe, data and progress."""

    name: str
    config: TrainConfig
    data: PreparedData
    files: ModelFiles  # its folder and what it writes there
    world: World
    device: torch.device
    model: nn.Module
    optimization: Optimization
    preprocessing: Preprocessing
    precision: Precision
    stopper: EarlyStopping
    freezer: transfer.BackboneFreezer
    train_set: TrainingSamples
    sampler: DistributedSampler
    batches: AugmentedBatches
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    finished: bool = False
    trained: nn.Module | None = None  # the model as it trains (DDP-wrapped with several processes)
    mix: BatchMix | None = None  # mixup / CutMix of training batches (--mix-prob)
    ema: AveragedModel | None = None  # the moving average of the weights (--ema-decay)

    @property
    def display(self) -> str:
        return self.model.arch.display_name

    @property
    def evaluated(self) -> nn.Module:
        """The weights validated each epoch and saved as best.pt: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def train_model(name: str, config: TrainConfig, data: PreparedData, files: ModelFiles,
                world: World, device: torch.device) -> dict:
    """Train (or continue training) one architecture; returns its report."""
    run = set_up(name, config, data, files, world, device)
    resume(run)
    for epoch in range(run.start_epoch, config.epochs + 1):
        if run.finished:
            break
        started = time.perf_counter()
        train_loss, train_acc, lr = train_epoch(run, epoch)
        val = evaluate(run.evaluated, data.splits["val"], run.optimization.criterion,
                       EvalTransform(run.preprocessing), run.precision, device, world)
        improved = run.stopper.step(val.loss)
        run.history.append({
            "epoch": epoch, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val.loss, "val_accuracy": val.accuracy,
            "seconds": time.perf_counter() - started,
        })
        run.finished = run.stopper.should_stop or epoch == config.epochs
        save(run, epoch, improved, val)
        log_epoch(run, improved)
        if math.isnan(val.loss):
            raise Failure(f"{run.display}: validation loss is NaN; training diverged (try a lower --lr)")
    distributed.barrier(world)
    return final_report(run)


def set_up(name: str, config: TrainConfig, data: PreparedData, files: ModelFiles,
           world: World, device: torch.device) -> ModelRun:
    files.folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = create_model(name, len(data.class_names))  # the same initial weights on every rank
    if world.rank:
        torch.manual_seed(config.seed + world.rank)  # but each rank its own dropout masks
    if config.init_weights and not files.last_checkpoint.exists():
        transfer.load_init_weights(model, config.init_weights, verbose=world.is_main)
    model.to(device)
    precision = Precision(device, config.precision)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, sampler, batches = train_loader(data, config, world, device)
    return ModelRun(
        name, config, data, files, world, device, model,
        optimization=build_optimization(model, config), preprocessing=preprocessing_for(config),
        precision=precision, stopper=EarlyStopping(config.patience, config.min_delta),
        freezer=transfer.BackboneFreezer(model, config.freeze_epochs),
        train_set=train_set, sampler=sampler, batches=batches,
        mix=build_mix(config, len(data.class_names)), ema=build_ema(model, config),
    )


def resume(run: ModelRun) -> None:
    """Continue from last.pt when it exists: weights (and their average), recipe, early
    stopping, history, RNG."""
    if not run.files.last_checkpoint.exists():
        return
    state = checkpoint.load(run.files.last_checkpoint)
    if state.get("class_names") != run.data.class_names:
        raise checkpoint.CheckpointError(f"'{run.files.last_checkpoint}' was trained on other classes")
    run.model.load_state_dict(state["model_state"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema_state"])
    run.optimization.load_state_dict(state)
    run.stopper.load_state_dict(state["early_stopping"])
    run.history, run.finished = state["history"], state["finished"]
    exact = _set_rng_state(state["rng"], run.world, run.device)
    run.start_epoch = state["epoch"] + 1
    if run.world.is_main:
        print(f"{run.display}: resuming after epoch {state['epoch']}"
              + (" (already finished)" if run.finished else "")
              + ("" if exact or run.finished else
                 f" with {run.world.size} process(es), not as before: random draws differ "
                 "from an uninterrupted run"), flush=True)


def train_epoch(run: ModelRun, epoch: int) -> tuple[float, float, float]:
    """One epoch of training with this epoch's augmentation and learning rate, then the
    schedule's step: (train loss, train accuracy, the learning rate it trained with)."""
    # DDP registers the parameters that need gradients when it wraps: wrap again when
    # freezing changes them.
    if run.freezer.apply(epoch) or run.trained is None:
        run.trained = None
        run.trained = _wrap(run.model, run.world, run.device)
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)  # fresh augmentation every epoch
    lr = run.optimization.optimizer.param_groups[0]["lr"]
    loss, accuracy = train_one_epoch(
        run.trained, run.batches, run.optimization.criterion, run.optimization.optimizer,
        run.precision, run.device, run.world, desc=f"{run.display} {epoch}/{run.config.epochs}",
        mix=run.mix, ema=run.ema,
    )
    run.optimization.scheduler.step()
    distributed.broadcast_buffers(run.model, run.world)
    if run.ema is not None:  # each rank averaged its own BatchNorm statistics
        distributed.broadcast_buffers(run.ema, run.world)
    return loss, accuracy, lr


def save(run: ModelRun, epoch: int, improved: bool, val) -> None:
    """best.pt (the evaluated weights: the EMA's when there is one) when validation loss
    improved; last.pt (the trained weights, their EMA, everything to resume) always."""
    rng = distributed.all_gather_objects(_rng_state(run.device), run.world)
    if not run.world.is_main:
        return
    if improved:
        best = checkpoint.model_record(run.name, run.evaluated, run.data.class_names, run.preprocessing)
        checkpoint.save({**best, "epoch": epoch, "val_loss": val.loss,
                         "val_accuracy": val.accuracy}, run.files.best_checkpoint)
    record = checkpoint.model_record(run.name, run.model, run.data.class_names, run.preprocessing)
    if run.ema is not None:
        record["ema_state"] = {k: v.detach().cpu() for k, v in run.ema.state_dict().items()}
    checkpoint.save({
        **record, "epoch": epoch, "finished": run.finished, "history": run.history,
        **run.optimization.state_dict(), "early_stopping": run.stopper.state_dict(), "rng": rng,
        "config": {k: v for k, v in to_dict(run.config).items() if v is not None},
    }, run.files.last_checkpoint)


def log_epoch(run: ModelRun, improved: bool) -> None:
    if not run.world.is_main:
        return
    row = run.history[-1]
    print(f"{run.display:>18} epoch {row['epoch']:>2}/{run.config.epochs}  lr {row['lr']:.1e}  "
          f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
          f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  "
          f"{row['seconds']:.1f}s{'  *' if improved else ''}", flush=True)
    if run.stopper.should_stop:
        print(f"{run.display}: stopping early, {run.stopper.bad_epochs} epochs without improvement",
              flush=True)


def final_report(run: ModelRun) -> dict:
    """Evaluate the best weights on val (and test) and write the model's report files."""
    if not run.files.best_checkpoint.exists():
        raise Failure(f"{run.display}: no best checkpoint in {run.files.folder} (with several machines, "
                           "the run folder must be on storage they all share)")
    best = checkpoint.load(run.files.best_checkpoint)
    run.model.load_state_dict(best["model_state"])
    best_row = next(row for row in run.history if row["epoch"] == best["epoch"])
    report = {
        "architecture": run.name,
        "display_name": run.display,
        "architecture_spec": run.model.arch.to_dict(),
        "preprocessing": run.preprocessing.to_dict(),
        "best_epoch": best["epoch"],
        "epochs_run": len(run.history),
        "train_loss": best_row["train_loss"],
        "train_accuracy": best_row["train_accuracy"],
    }
    transform = EvalTransform(run.preprocessing)
    evaluations = {}
    for split in ("val", "test"):
        if split not in run.data.splits:
            continue
        result = evaluations[split] = evaluate(run.model, run.data.splits[split], run.optimization.criterion,
                                               transform, run.precision, run.device, run.world)
        matrix = metrics.confusion_matrix(result.labels, result.predictions, len(run.data.class_names))
        per_class = metrics.per_class_metrics(matrix, run.data.class_names)
        report[f"{split}_loss"], report[f"{split}_accuracy"] = result.loss, result.accuracy
        report[f"{split}_macro_f1"] = metrics.macro_f1(per_class)
        report["per_class" if split == "val" else "test_per_class"] = per_class
        if split == "val":
            val_matrix = matrix
    # Temperature and abstention threshold, fitted on validation only (the test split stays unseen).
    record = calibrate.calibration_record(evaluations["val"].logits.numpy(), evaluations["val"].labels.numpy())
    report["calibration"] = calibrate.summary(record)
    report.update({
        "parameters": count_parameters(run.model),
        "mult_adds": count_mult_adds(run.model, run.preprocessing.input_size),
        "image_size": list(run.preprocessing.input_size),
        "class_names": run.data.class_names,
        "seconds": sum(row["seconds"] for row in run.history),
        "stopped_early": run.history[-1]["epoch"] < run.config.epochs,
    })
    if run.world.is_main:
        files = run.files
        reports.write_history(files.history, run.history)
        reports.write_predictions(files.predictions, {
            split: (run.data.splits[split], result) for split, result in evaluations.items()},
            run.data.class_names)
        checkpoint.save({**best, "calibration": record}, files.best_checkpoint)
        reports.write_logits(files.logits, [
            (split, path, run.data.class_names[int(label)], logits.tolist())
            for split, result in evaluations.items()
            for path, label, logits in zip(run.data.splits[split].paths, result.labels, result.logits)],
            run.data.class_names)
        print(f"{run.display}: {calibrate.describe(record)}", flush=True)
        reports.plot_curves(files.curves_png, run.history, run.display, report["best_epoch"])
        draw_confusion(files.confusion_png, val_matrix, run.data.class_names,
                       f"{run.display}: validation, best epoch {report['best_epoch']}")
        write_json(files.report, report)
    return report


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

"""``python -m benchmarks.train``: is the input pipeline the bottleneck of a training epoch?

In one process, in alternating rounds: a training epoch fed by the real pipeline (the decoded
images read from the disk cache through TrainingSamples, each sample's crop, the DataLoader and the batched augmentation on the device,
exactly as training.trainer.train_loader builds them) against the same number of steps fed by batches already in memory (the compute bound), both
through the real epoch loop (training.engine.train_one_epoch). The ratio of their images per
second is the input-pipeline ratio: 1.0 means the pipeline costs nothing. The pipeline alone
(the loader iterated with no model) is timed too, to show where the time goes.

Prints a table and writes benchmarks/results/train.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import model_names, RESULTS_DIR, command_line, machine, markdown_table, write_json
from common.datasets import DataError, index_image_folder
from training import distributed
from training.config import QUICK_PROFILE, ConfigError, TrainConfig, make_config
from training.data import prepare_data
from training.engine import Precision, train_one_epoch
from training.models import create_model
from training.recipe import build_optimization
from training.synthetic import ensure_builtin_dataset
from training.trainer import (cache_dir_for, default_workers, preprocessing_for, train_loader,
                              train_storage_for)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="ImageFolder root (default: the built-in dataset)")
    parser.add_argument("--models", default="resnet34", help="comma-separated model names (default: resnet34)")
    parser.add_argument("--image-size", type=int, default=QUICK_PROFILE["image_size"],
                        help=f"px (default: {QUICK_PROFILE['image_size']}, the built-in quick profile)")
    parser.add_argument("--batch-size", type=int, default=QUICK_PROFILE["batch_size"])
    parser.add_argument("--workers", type=int, default=-1, help="loader processes (-1: as training chooses)")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many training images")
    parser.add_argument("--rounds", type=int, default=6, help="epochs of each kind (default: 6)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-cache", action="store_true",
                        help="decoded images in memory, not read from the disk cache")
    parser.add_argument("--out", default=str(RESULTS_DIR / "train.json"), help="JSON results file")
    return parser.parse_args(argv)


def _loop(model, batches, criterion, optimizer, precision, device, world) -> float:
    """Seconds for one pass of the real epoch loop over ``batches``."""
    started = time.perf_counter()
    train_one_epoch(model, batches, criterion, optimizer, precision, device, world, desc="")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def benchmark_model(name: str, data, config: TrainConfig, rounds: int, device: torch.device) -> dict:
    world = distributed.World()
    torch.manual_seed(config.seed)
    model = create_model(name, len(data.class_names)).to(device)
    precision = Precision(device, config.precision)  # the trainer's choice
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    recipe = build_optimization(model, config)  # the trainer's own optimizer and loss
    optimizer, criterion = recipe.optimizer, recipe.criterion
    train_set, sampler, loader = train_loader(data, config, world, device)

    def epoch_of(epoch: int):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        return loader

    # One epoch's batches, augmented once and kept on the device: the compute bound.
    in_memory = [(precision.layout(x.to(device)), y.to(device))
                 for x, y in epoch_of(0)]
    images = sum(len(labels) for _, labels in in_memory)
    _loop(model, in_memory[:2], criterion, optimizer, precision, device, world)  # warm-up
    real, bound, pipeline_only = [], [], []
    for r in range(rounds):
        order = ("real", "bound") if r % 2 == 0 else ("bound", "real")
        for kind in order:
            if kind == "real":
                real.append(images / _loop(model, epoch_of(r + 1), criterion, optimizer, precision, device, world))
            else:
                bound.append(images / _loop(model, in_memory, criterion, optimizer, precision, device, world))
        started = time.perf_counter()
        for _ in epoch_of(100 + r):
            pass
        pipeline_only.append(images / (time.perf_counter() - started))
    result = {
        "images_per_epoch": images, "steps_per_epoch": len(in_memory),
        "real_pipeline_images_per_second": statistics.median(real),
        "in_memory_images_per_second": statistics.median(bound),
        "pipeline_alone_images_per_second": statistics.median(pipeline_only),
        "rounds": {"real": real, "in_memory": bound, "pipeline_alone": pipeline_only},
    }
    result["input_pipeline_ratio"] = result["real_pipeline_images_per_second"] / result["in_memory_images_per_second"]
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    names = model_names(args.models)
    if names is None:
        return 2
    root = Path(args.data) if args.data else ensure_builtin_dataset()
    try:
        config = make_config({"data": str(root), "image_size": args.image_size,
                              "batch_size": args.batch_size, "workers": args.workers,
                              "test_fraction": QUICK_PROFILE["test_fraction"],
                              "no_cache": args.no_cache})
        data = prepare_data(index_image_folder(root), preprocessing_for(config), config.val_fraction,
                            config.test_fraction, config.seed, train_storage=train_storage_for(config),
                            cache_dir=cache_dir_for(config))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.max_images:
        train = data.splits["train"]
        data.splits["train"] = train.take(range(min(args.max_images, len(train))))
    workers = default_workers() if config.workers < 0 else config.workers
    print(f"Training-epoch benchmark: {', '.join(names)}, {len(data.splits['train'])} images at "
          f"{args.image_size} px, batch {config.batch_size}, {workers} loader worker(s), "
          f"{torch.get_num_threads()} threads, {device}", flush=True)
    results = {"command": command_line(argv, "benchmarks.train"), "machine": machine(),
               "image_size": args.image_size, "batch_size": config.batch_size, "workers": workers,
               "device": str(device), "models": {}}
    rows = []
    for name in names:
        r = benchmark_model(name, data, config, args.rounds, device)
        results["models"][name] = r
        rows.append([name, r["real_pipeline_images_per_second"], r["in_memory_images_per_second"],
                     f"{r['input_pipeline_ratio']:.2f}x", r["pipeline_alone_images_per_second"]])
        print(f"  {name}: real {r['real_pipeline_images_per_second']:.1f} img/s, in memory "
              f"{r['in_memory_images_per_second']:.1f} img/s", flush=True)
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print("\n" + markdown_table(["model", "real pipeline (img/s)", "in memory (img/s)",
                                 "input-pipeline ratio", "pipeline alone (img/s)"], rows))
    print(f"\nWrote {write_json(Path(args.out), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

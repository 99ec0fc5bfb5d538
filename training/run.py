"""``python -m training.run``: train the three models on one dataset and compare them.

With no arguments: the built-in dataset, quick profile (see training/config.py). Run with
``torchrun --nproc_per_node N -m training.run ...`` for DistributedDataParallel.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from common.cpu import usable_logical_cpus
from common.datasets import index_csv, index_image_folder
from common.errors import run_cli
from common.files import write_json
from common.run_layout import RUNS_DIR, RunLayout, newest_run
from training import calibrate, distributed, transfer
from training.config import RESUME_FLAGS, ConfigError, TrainConfig, config_from_args, from_dict, to_dict
from training.attention import write_heatmaps
from training.comparison import write_comparison
from training.engine import Precision
from training.data import cross_validation_folds, prepare_data
from training.study import members
from training.synthetic import ensure_builtin_dataset
from training.trainer import cache_dir_for, preprocessing_for, train_model, train_storage_for

def new_run_dir(config: TrainConfig) -> Path:
    if config.out:
        run_dir = Path(config.out)
        if RunLayout(run_dir).config.exists():
            raise ConfigError(f"'{run_dir}' already holds a run; continue it with --resume "
                              f"{run_dir} or choose another --out")
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = RUNS_DIR / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = RUNS_DIR / f"{stamp}-{n}"
    return run_dir


def resolve_run(config: TrainConfig, resume: str | None, given: set[str]) -> tuple[TrainConfig, Path]:
    """The run folder, and for --resume the config the run was started with."""
    if not resume:
        return config, new_run_dir(config)
    run_dir = Path(config.out) if resume == "latest" and config.out else (
        newest_run() if resume == "latest" else Path(resume))
    saved = RunLayout(run_dir).config
    if not saved.is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder (no config.json)")
    resumed = from_dict(json.loads(saved.read_text()))
    return dataclasses.replace(resumed, **{n: getattr(config, n) for n in given & RESUME_FLAGS}), run_dir


def load_dataset(config: TrainConfig, world: distributed.World):
    root = Path(config.data)
    if config.builtin_data:  # generated on first use, by one process
        if world.is_main:
            ensure_builtin_dataset(root)
        distributed.barrier(world)
    index = index_csv(Path(config.labels_csv), root) if config.labels_csv else index_image_folder(root)
    if config.folds and "val" in index.splits:
        raise ConfigError(f"--folds makes its own validation folds, but '{root}' has a val/ folder; "
                          "drop --folds or the val/ folder")
    processes = max(1, usable_logical_cpus() // distributed.local_size())  # every rank decodes
    return prepare_data(index, preprocessing_for(config), config.val_fraction, config.test_fraction,
                        config.seed, processes, require_val=not config.folds,
                        train_storage=train_storage_for(config), cache_dir=cache_dir_for(config))


def _listed(split) -> list:
    return [[p, int(label)] for p, label in zip(split.paths, split.labels.tolist())]


def describe(data, run_dir: Path) -> str:
    sizes = " / ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    line = (f"{len(data.class_names)} classes ({', '.join(data.class_names)}); "
            f"{data.total_files} files: {sizes}")
    if data.bad_files:
        line += f"; skipped {len(data.bad_files)} bad file(s), listed in {RunLayout(run_dir).bad_files}"
    return line


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: train(argv), interrupted="interrupted; continue with --resume")


def train(argv: list[str] | None = None) -> int:
    world = distributed.World()
    try:
        config, resume, given, notices = config_from_args(argv)
        config, run_dir = resolve_run(config, resume, given)
        world, device = distributed.init(config.device)
        run_dir = Path(distributed.broadcast(str(run_dir), world))
        data = load_dataset(config, world)
        study, layout = members(config), RunLayout(run_dir)
        folds = cross_validation_folds(data, config.folds, config.seed) if config.folds else None
        fresh = [n for n in config.models if not layout.member_files(n, study[0]).last_checkpoint.exists()]
        if config.init_weights and fresh:  # refuse a wrong file before a run folder is made
            transfer.check_init_weights(config.init_weights, fresh, len(data.class_names))
        trained_on = [p for split in data.splits.values() for p in split.paths]
        ood = calibrate.load_ood(config, trained_on, preprocessing_for(config))
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            precision = Precision(device, config.precision).chosen()
            write_json(layout.config, to_dict(config, {"precision": precision}))
            write_json(layout.bad_files, data.bad_files)
            listed = {"class_names": data.class_names}
            if folds:  # each fold's validation images; a fold trains on all the others
                listed["folds"] = [_listed(fold.splits["val"]) for fold in folds]
                listed.update({k: _listed(v) for k, v in data.splits.items() if k == "test"})
            else:
                listed.update({name: _listed(split) for name, split in data.splits.items()})
            write_json(layout.splits, listed)
            print(f"Run folder: {run_dir}\nData: {config.data}: {describe(data, run_dir)}\n"
                  f"Images: {data.decoding}\n"
                  f"Device: {device}" + (f" x {world.size} processes" if world.distributed else "")
                  + f"\nPrecision: {precision}"
                  + (f"\nRuns per model: {len(study)} ({', '.join(m.label for m in study)})"
                     if len(study) > 1 else "")
                  + (f"\nOut-of-distribution check: {len(ood.paths)} images in {ood.folder}" if ood else ""),
                  flush=True)
            for notice in notices:
                print(notice[0].upper() + notice[1:], flush=True)
        for member in study:  # a resumed study skips finished runs and continues the one it was in
            member_config = dataclasses.replace(config, seed=member.seed)
            member_data = folds[member.fold] if folds else data
            for name in config.models:
                if world.is_main and member.label:
                    print(f"--- {name}, {member.label}", flush=True)
                train_model(name, member_config, member_data, layout.member_files(name, member),
                            world, device)
        if world.is_main:
            sizes = ", ".join(f"{n} {len(s)}" for n, s in data.splits.items())
            if folds:
                pooled = sum(len(fold.splits["val"]) for fold in folds)
                sizes = f"{len(folds)} folds of {pooled} images" + (
                    f", test {len(data.splits['test'])}" if "test" in data.splits else "")
            if ood:
                calibrate.write_ood_logits(run_dir, list(config.models), study, ood, preprocessing_for(config),
                                           Precision(device, config.precision), device)
            write_heatmaps(run_dir, list(config.models), study[0], data.class_names, config.seed)
            write_comparison(run_dir, config, study, {
                "dataset": config.data, "classes": len(data.class_names), "split_sizes": sizes,
                "image_size": config.image_size, "device": f"{device}" + (
                    f" x {world.size}" if world.distributed else ""),
            })
            print("\n" + layout.comparison_md.read_text(), flush=True)
        return 0
    finally:
        distributed.shutdown(world)


if __name__ == "__main__":
    sys.exit(main())

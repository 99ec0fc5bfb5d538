"""Datasets for training: check every file once, split, and serve augmented batches.

The layouts (ImageFolder, pre-made splits, CSV) are indexed by common.datasets, the same
indexer serve.evaluate uses. Every file is decoded once, before training (``decode_all``):
unusable files are skipped and reported, and the decoded, resized uint8 images are kept in a
cache on disk (or in memory with ``--no-cache``; see ``training.image_cache``), so each epoch
only draws its random augmentation from them.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.cpu import usable_logical_cpus
from common.datasets import DataError, DatasetIndex, Sample
from imaging.preprocessing import Preprocessing
from training.image_cache import DecodeWork, ImageRows, decode_files


def decode_all(samples: list[Sample], specs: list[Preprocessing], processes: int | None = None,
               cache_dir: Path | None = None) -> tuple[list[ImageRows], list[Sample], list[dict], DecodeWork]:
    """Decode and resize every file once, in parallel, at each spec's size (see image_cache).

    Returns (per spec, the images of the samples that decoded; those samples; bad-file records;
    how many files were decoded and how many the cache held).
    """
    decoded = decode_files([s.path for s in samples], specs, cache_dir, processes or usable_logical_cpus())
    return decoded.images, [samples[i] for i in decoded.good], decoded.bad, decoded.work


def stratified_split(samples: list[Sample], fractions: dict[str, float], seed: int) -> dict[str, list[Sample]]:
    """Split per class: each fraction of every class goes to its split, the rest to train."""
    by_class = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = np.random.default_rng(seed)
    out = {"train": [], **{name: [] for name in fractions}}
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        start = 0
        for name, fraction in fractions.items():
            # At least one image per class in each split, while train keeps at least one.
            count = max(1, round(len(members) * fraction)) if fraction > 0 else 0
            count = min(count, len(members) - start - 1)
            out[name] += [members[i] for i in order[start:start + count]]
            start += count
        out["train"] += [members[i] for i in order[start:]]
    return out


@dataclass
class SplitImages:
    """One split, decoded: images (N x 3 x H x W uint8, the evaluation pixels) with their
    labels and source files, and for images that may be trained on, ``train_images``: the
    larger copies random crops are cut from (None: crop from ``images``)."""

    images: ImageRows
    labels: torch.Tensor
    paths: list[str]
    train_images: ImageRows | None = None

    def __post_init__(self):
        if isinstance(self.images, torch.Tensor):  # pixels already in memory
            self.images = ImageRows.of(self.images)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows) -> "SplitImages":
        rows = np.asarray(rows, np.int64)
        return SplitImages(self.images.take(rows), self.labels[torch.from_numpy(rows)],
                           [self.paths[i] for i in rows.tolist()],
                           None if self.train_images is None else self.train_images.take(rows))

    def concat(self, other: "SplitImages") -> "SplitImages":
        both = self.train_images is not None and other.train_images is not None
        if not both and (self.train_images is not None or other.train_images is not None):
            raise ValueError("only splits that both have (or both lack) training copies can be joined")
        return SplitImages(self.images.concat(other.images), torch.cat([self.labels, other.labels]),
                           self.paths + other.paths,
                           self.train_images.concat(other.train_images) if both else None)


@dataclass
class PreparedData:
    class_names: list[str]
    splits: dict[str, SplitImages]
    bad_files: list[dict]
    total_files: int
    decoding: DecodeWork | None = None  # the work of decoding the files (None: not measured)


def prepare_data(index: DatasetIndex, preprocessing: Preprocessing, val_fraction: float,
                 test_fraction: float, seed: int, processes: int | None = None,
                 require_val: bool = True, train_storage: Preprocessing | None = None,
                 cache_dir: Path | None = None) -> PreparedData:
    """Decode every file once, drop and report bad ones, then split (unless split already).

    Every image is decoded at ``preprocessing``'s size; the ones that may be trained on also at
    ``train_storage``'s (the larger copies crops are cut from). ``cache_dir``: the decoded-image
    cache (None: in memory). ``require_val=False``: a premade train/ (+ test/) without val/ is
    fine (cross-validation makes its own folds)."""
    if len(index.class_names) < 2:  # training's rule; evaluating one class is fine (common.datasets)
        only = index.class_names[0] if index.class_names else "none"
        raise DataError(f"only one class ({only}) in '{index.where}'; a classifier needs at least two")
    bad = list(index.bad_files)
    decoded, work = {}, DecodeWork(Path(cache_dir) if cache_dir is not None else None)
    for name, samples in index.splits.items():
        trainable = train_storage is not None and name in ("train", "all")
        specs = [preprocessing, train_storage] if trainable else [preprocessing]
        images, good, split_bad, split_work = decode_all(samples, specs, processes, cache_dir)
        bad += split_bad
        work += split_work
        decoded[name] = (images, good)
    total = sum(len(s) for s in index.splits.values()) + len(index.bad_files)
    # Every class needs images to train on: with premade splits, in train/ itself.
    trained_on = [decoded["train"]] if index.presplit else list(decoded.values())
    counts = Counter(s.label for _, good in trained_on for s in good)
    empty = [index.class_names[c] for c in range(len(index.class_names)) if counts[c] == 0]
    if empty:
        raise DataError(
            f"class(es) {', '.join(empty)} have no valid {'training ' if index.presplit else ''}"
            f"images left after skipping {len(bad)} bad file(s)"
        )
    splits = {
        name: SplitImages(images[0], torch.tensor([s.label for s in good], dtype=torch.long),
                          [s.path for s in good], images[1] if len(images) > 1 else None)
        for name, (images, good) in decoded.items()
    }
    if not index.presplit:
        everything, good = splits.pop("all"), decoded["all"][1]
        row_of = {id(s): i for i, s in enumerate(good)}
        fractions = {"val": val_fraction, **({"test": test_fraction} if test_fraction > 0 else {})}
        for name, members in stratified_split(good, fractions, seed).items():
            splits[name] = everything.take([row_of[id(s)] for s in members])
    if require_val and not len(splits.get("val", ())):
        raise DataError("the validation split is empty; add images or a val/ folder")
    splits = {name: split for name, split in splits.items() if len(split)}
    return PreparedData(index.class_names, splits, bad, total, work)


def cross_validation_folds(data: PreparedData, folds: int, seed: int) -> list[PreparedData]:
    """Stratified K-fold splits of the images outside the test split: fold k validates on its
    own share of every class and trains on the rest, so each image is validated exactly once."""
    pool = data.splits["train"]
    if "val" in data.splits:
        pool = pool.concat(data.splits["val"])
    fold_of = np.empty(len(pool), dtype=np.int64)
    rng = np.random.default_rng(seed)
    labels = pool.labels.numpy()
    for label in range(len(data.class_names)):
        members = np.flatnonzero(labels == label)
        if len(members) < folds:
            raise DataError(f"class {data.class_names[label]} has {len(members)} image(s) outside the "
                            f"test split, fewer than --folds {folds}")
        fold_of[rng.permutation(members)] = np.arange(len(members)) % folds
    out = []
    for k in range(folds):
        splits = {"train": pool.take(np.flatnonzero(fold_of != k)),
                  "val": pool.take(np.flatnonzero(fold_of == k))}
        if "test" in data.splits:
            splits["test"] = data.splits["test"]
        out.append(PreparedData(data.class_names, splits, data.bad_files, data.total_files))
    return out


class TrainingSamples(torch.utils.data.Dataset):
    """Decoded training images with the augmentation drawn for them, fresh per sample and epoch.

    Sample ``i`` of epoch ``e`` draws its parameters from its own seed (seed, e, i), so the
    augmentation is the same whatever the batch, the number of workers or of processes, and a
    resumed run sees exactly the images an uninterrupted one would have seen. Each sample's
    random crop is cut here from the stored copy (``train_images``, larger than the training
    size); the rest of the augmentation runs on whole batches, on the training device
    (``training.trainer.AugmentedBatches``).
    """

    def __init__(self, split: SplitImages, augment, seed: int):
        self.split, self.augment, self.seed = split, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        stored = self.split.images if self.split.train_images is None else self.split.train_images
        image = stored[i]
        parameters = self.augment.draw(random.Random(sample_seed), image.shape[-2:])
        return self.augment.crop(image, parameters), parameters, self.split.labels[i]

"""Datasets: find the images, check every file once, split, and serve augmented batches.

Layouts:
- ImageFolder: ``root/<class>/<images>``, or ``root/{train,val[,test]}/<class>/<images>``
  for splits made in advance (used as given; a lone ``train/`` is split like ``root``);
- CSV: ``--labels-csv FILE`` with columns ``filename,label`` and ``--data IMAGE_DIR``.

Every file is decoded once, before training (``decode_all``): unusable files are skipped and
reported, and the decoded, resized uint8 images are kept in memory, so each epoch only draws
its random augmentation from them.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import imaging
from common.errors import UserError
from common.files import class_folders, files_under
from imaging.preprocessing import Preprocessing

SPLITS = ("train", "val", "test")


class DataError(UserError):
    """A problem with the user's data, reported as one line without a traceback."""


@dataclass
class Sample:
    path: str
    label: int


@dataclass
class DatasetIndex:
    """Which files belong to which class and split, before any file is opened."""

    class_names: list[str]
    splits: dict[str, list[Sample]]  # pre-made splits, or everything under "all"
    bad_files: list[dict] = field(default_factory=list)  # e.g. CSV rows naming missing files

    @property
    def presplit(self) -> bool:
        return "all" not in self.splits


def index_image_folder(root: Path) -> DatasetIndex:
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist")
    premade = [s for s in SPLITS if (root / s).is_dir()]
    if premade == ["train"]:  # train/ alone: its classes, with validation split off as usual
        root, premade = root / "train", []
    if "train" in premade:
        class_names = [p.name for p in class_folders(root / "train")]
        splits = {}
        for split in premade:
            names = [p.name for p in class_folders(root / split)]
            unknown = sorted(set(names) - set(class_names))
            if unknown:
                raise DataError(
                    f"unknown label(s) {', '.join(unknown)} in '{root / split}': "
                    f"not a class folder of '{root / 'train'}'"
                )
            splits[split] = [
                Sample(str(f), class_names.index(name))
                for name in names for f in files_under(root / split / name)
            ]
    else:
        class_names = [p.name for p in class_folders(root)]
        splits = {"all": [
            Sample(str(f), label)
            for label, name in enumerate(class_names) for f in files_under(root / name)
        ]}
    index = DatasetIndex(class_names, splits)
    _check_classes(index, root)
    return index


def index_csv(csv_path: Path, image_dir: Path) -> DatasetIndex:
    if not csv_path.is_file():
        raise DataError(f"labels CSV '{csv_path}' does not exist")
    if not image_dir.is_dir():
        raise DataError(f"image folder '{image_dir}' does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "filename" not in header or "label" not in header:
            raise DataError(
                f"'{csv_path}' needs a header with columns filename,label (found: {','.join(header)})"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    bad, entries = [], []
    for line, row in enumerate(rows, start=2):
        if not row["label"]:
            raise DataError(f"'{csv_path}' line {line}: unknown label (empty) for '{row['filename']}'")
        path = image_dir / row["filename"]
        if not path.is_file():
            bad.append({"path": str(path), "reason": f"listed in {csv_path.name} line {line} but missing"})
            continue
        entries.append((str(path), row["label"]))
    class_names = sorted({label for _, label in entries})
    index = DatasetIndex(
        class_names,
        {"all": [Sample(path, class_names.index(label)) for path, label in entries]},
        bad,
    )
    _check_classes(index, csv_path)
    return index


def _check_classes(index: DatasetIndex, where: Path) -> None:
    if not any(index.splits.values()):
        missing = f" ({len(index.bad_files)} listed files are missing)" if index.bad_files else ""
        raise DataError(f"no images found in '{where}'{missing}; expected <class>/<image> files")
    if len(index.class_names) < 2:
        only = index.class_names[0] if index.class_names else "none"
        raise DataError(f"only one class ({only}) in '{where}'; a classifier needs at least two")


def _decode_one(args: tuple[str, Preprocessing]) -> np.ndarray | str:
    path, preprocessing = args
    try:  # numpy only: this runs in forked processes, where torch's thread pools are unsafe
        return preprocessing.pixels(imaging.load_rgb(path)).transpose(2, 0, 1)
    except imaging.ImageError as exc:
        return str(exc)
    except OSError as exc:  # e.g. permission denied
        return f"cannot read file ({exc.strerror or exc})"


def decode_all(samples: list[Sample], preprocessing: Preprocessing, processes: int | None = None):
    """Decode and resize every file once, in parallel, as ``preprocessing`` says.

    Returns (images as an N x 3 x H x W uint8 tensor, the samples that decoded, bad-file records).
    """
    processes = processes or os.cpu_count() or 1
    size = preprocessing.input_size
    jobs = [(s.path, preprocessing) for s in samples]
    if processes > 1 and len(jobs) > 64:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method)) as pool:
            results = list(pool.map(_decode_one, jobs, chunksize=16))
    else:
        results = [_decode_one(job) for job in jobs]
    good, arrays, bad = [], [], []
    for sample, result in zip(samples, results):
        if isinstance(result, str):
            bad.append({"path": sample.path, "reason": result})
        else:
            good.append(sample)
            arrays.append(result)
    images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))) if arrays else torch.empty(0, 3, *size, dtype=torch.uint8)
    return images, good, bad


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
    """One split, decoded: images (N x 3 x H x W uint8) with their labels and source files."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class PreparedData:
    class_names: list[str]
    splits: dict[str, SplitImages]
    bad_files: list[dict]
    total_files: int


def prepare_data(index: DatasetIndex, preprocessing: Preprocessing, val_fraction: float,
                 test_fraction: float, seed: int, processes: int | None = None,
                 require_val: bool = True) -> PreparedData:
    """Decode every file once, drop and report bad ones, then split (unless split already).
    ``require_val=False``: a premade train/ (+ test/) without val/ is fine (cross-validation
    makes its own folds)."""
    bad = list(index.bad_files)
    decoded = {}
    for name, samples in index.splits.items():
        images, good, split_bad = decode_all(samples, preprocessing, processes)
        bad += split_bad
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
    if not index.presplit:
        images, good = decoded.pop("all")
        row_of = {id(s): i for i, s in enumerate(good)}
        fractions = {"val": val_fraction, **({"test": test_fraction} if test_fraction > 0 else {})}
        for name, members in stratified_split(good, fractions, seed).items():
            rows = torch.tensor([row_of[id(s)] for s in members], dtype=torch.long)
            decoded[name] = (images[rows], members)
    if require_val and (not decoded.get("val") or not decoded["val"][1]):
        raise DataError("the validation split is empty; add images or a val/ folder")
    splits = {
        name: SplitImages(images, torch.tensor([s.label for s in good]), [s.path for s in good])
        for name, (images, good) in decoded.items()
        if good
    }
    return PreparedData(index.class_names, splits, bad, total)


def _subset(split: SplitImages, rows: list[int]) -> SplitImages:
    index = torch.tensor(rows, dtype=torch.long)
    return SplitImages(split.images[index], split.labels[index], [split.paths[i] for i in rows])


def cross_validation_folds(data: PreparedData, folds: int, seed: int) -> list[PreparedData]:
    """Stratified K-fold splits of the images outside the test split: fold k validates on its
    own share of every class and trains on the rest, so each image is validated exactly once."""
    pool = data.splits["train"]
    if "val" in data.splits:
        val = data.splits["val"]
        pool = SplitImages(torch.cat([pool.images, val.images]), torch.cat([pool.labels, val.labels]),
                           pool.paths + val.paths)
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
        splits = {"train": _subset(pool, np.flatnonzero(fold_of != k).tolist()),
                  "val": _subset(pool, np.flatnonzero(fold_of == k).tolist())}
        if "test" in data.splits:
            splits["test"] = data.splits["test"]
        out.append(PreparedData(data.class_names, splits, data.bad_files, data.total_files))
    return out


class TrainingSamples(torch.utils.data.Dataset):
    """Decoded training images with the augmentation drawn for them, fresh per sample and epoch.

    Sample ``i`` of epoch ``e`` draws its parameters from its own seed (seed, e, i), so the
    augmentation is the same whatever the batch, the number of workers or of processes, and a
    resumed run sees exactly the images an uninterrupted one would have seen. The augmentation
    itself runs on whole batches, on the training device (``training.trainer.AugmentedBatches``).
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
        return self.split.images[i], self.augment.draw(random.Random(sample_seed)), self.split.labels[i]

"""Labelled images on disk, found without opening a file (torch-free: training and serve.evaluate
index the same way).

Layouts:
- ImageFolder: ``root/<class>/<images>``, or ``root/{train,val[,test]}/<class>/<images>`` for
  splits made in advance (a lone ``train/`` is indexed like ``root``);
- CSV: a ``filename,label`` file and the folder its file names are relative to.

Every non-hidden file below a class folder is listed, in a stable order (common.files);
unusable ones are found and reported when decoded. CSV rows naming missing files are reported,
not fatal.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.files import class_folders, files_under

SPLITS = ("train", "val", "test")


class DataError(UserError):
    """A problem with the user's data, reported as one line without a traceback."""


@dataclass
class Sample:
    path: str
    label: int  # index into the DatasetIndex's class_names


@dataclass
class DatasetIndex:
    """Which files belong to which class and split, before any file is opened."""

    class_names: list[str]
    splits: dict[str, list[Sample]]  # pre-made splits, or everything under "all"
    where: str  # what was indexed (a folder or the CSV), for messages and reports
    bad_files: list[dict] = field(default_factory=list)  # {"path", "reason"}: CSV rows naming missing files

    @property
    def presplit(self) -> bool:
        return "all" not in self.splits


def premade_splits(root: Path) -> list[str]:
    """The split folders ``root`` has, in SPLITS order."""
    _require_folder(root)
    return [s for s in SPLITS if (root / s).is_dir()]


def index_class_folders(folder: Path) -> DatasetIndex:
    """``folder/<class>/<images>``: one class per sub-folder, everything under "all"."""
    _require_folder(folder)
    class_names = [p.name for p in class_folders(folder)]
    index = DatasetIndex(class_names, {"all": [
        Sample(str(f), label) for label, name in enumerate(class_names) for f in files_under(folder / name)
    ]}, str(folder))
    _require_images(index, "; expected <class>/<image> files")
    return index


def index_image_folder(root: Path) -> DatasetIndex:
    """Every ImageFolder layout: pre-made splits used as given, with the classes of ``train/``
    (a class folder elsewhere that train/ lacks is an error); otherwise one pool under "all"."""
    premade = premade_splits(root)
    if premade == ["train"]:  # train/ alone: its classes, with validation split off as usual
        return index_class_folders(root / "train")
    if "train" not in premade:
        return index_class_folders(root)
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
            Sample(str(f), class_names.index(name)) for name in names for f in files_under(root / split / name)
        ]
    index = DatasetIndex(class_names, splits, str(root))
    _require_images(index, "; expected <class>/<image> files")
    return index


def index_csv(csv_path: Path, image_dir: Path) -> DatasetIndex:
    """The rows of a ``filename,label`` CSV whose files exist under ``image_dir``; the classes
    are the labels of those rows, sorted."""
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
        str(csv_path),
        bad,
    )
    _require_images(index, "")
    return index


def _require_folder(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist")


def _require_images(index: DatasetIndex, hint: str) -> None:
    if not any(index.splits.values()):
        missing = f" ({len(index.bad_files)} listed files are missing)" if index.bad_files else ""
        raise DataError(f"no images found in '{index.where}'{missing}{hint}")

"""Labelled images in the layouts training accepts, found without torch (for serve.evaluate).

- ImageFolder: ``root/<class>/<images>``, or ``root/{train,val,test}/<class>/<images>``;
- CSV: a ``filename,label`` file and the folder the file names are relative to.

The same rules as training.data's indexer (which imports torch, so serve/ cannot use it):
non-hidden files, sorted, every file listed (unusable ones are reported when decoded).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.files import class_folders, files_under

SPLITS = ("train", "val", "test")


@dataclass
class Labelled:
    where: str  # what was indexed, for the report
    split: str | None  # the pre-made split used, if any
    samples: list[tuple[str, str]]  # (path, class name)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def class_names(self) -> list[str]:
        return sorted({label for _, label in self.samples})


def index_folder(root: Path, split: str | None = None) -> Labelled:
    """``split`` picks a pre-made split; by default the held-out one: test, else val."""
    if not root.is_dir():
        raise UserError(f"data folder '{root}' does not exist")
    premade = [s for s in SPLITS if (root / s).is_dir()]
    if split is None and premade:
        split = "test" if "test" in premade else "val" if "val" in premade else "train"
    if split is not None:
        if split not in premade:
            raise UserError(f"no '{split}' folder in '{root}'"
                            + (f" (found: {', '.join(premade)})" if premade else ""))
        base = root / split
    else:
        base = root
    samples = [(str(f), folder.name) for folder in class_folders(base) for f in files_under(folder)]
    if not samples:
        raise UserError(f"no images found in '{base}'; expected <class>/<image> files")
    return Labelled(str(base), split, samples)


def index_csv(csv_path: Path, image_dir: Path) -> Labelled:
    if not csv_path.is_file():
        raise UserError(f"labels CSV '{csv_path}' does not exist")
    if not image_dir.is_dir():
        raise UserError(f"image folder '{image_dir}' does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "filename" not in header or "label" not in header:
            raise UserError(f"'{csv_path}' needs a header with columns filename,label "
                            f"(found: {','.join(header)})")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    samples, missing = [], []
    for line, row in enumerate(rows, start=2):
        if not row["label"]:
            raise UserError(f"'{csv_path}' line {line}: no label for '{row['filename']}'")
        path = image_dir / row["filename"]
        if path.is_file():
            samples.append((str(path), row["label"]))
        else:
            missing.append((str(path), f"listed in {csv_path.name} line {line} but missing"))
    if not samples:
        raise UserError(f"no images found from '{csv_path}'"
                        + (f" ({len(missing)} listed files are missing)" if missing else ""))
    return Labelled(str(csv_path), None, samples, missing)

"""The models a folder offers: read its manifest.json, load each listed .onnx file once.

The manifest (written by ``python -m export.run``) says which files to load and where the
example images are; everything about a model itself (class names, input size, display name,
precision) is read back from the .onnx file's metadata by the Predictor.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from common.errors import UserError
from common.files import sha256_of
from serve.predictor import ModelFileError, Predictor

PRECISIONS = ("fp32", "int8")


class CatalogError(UserError):
    """A models folder that cannot be served, with a one-line reason."""


@dataclass
class Catalog:
    folder: Path
    precision: str
    predictors: list[Predictor]
    examples: list[Path] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # model name -> the served file's

    @property
    def class_names(self) -> list[str]:
        return self.predictors[0].class_names

    def describe(self) -> list[dict]:
        """What a client needs to know about each served model (GET /api/v1/models)."""
        models = []
        for p in self.predictors:
            accuracy = float(p.metadata.get("val_accuracy", "nan"))
            models.append({
                "name": p.name, "display_name": p.display_name, "precision": p.precision,
                "class_names": p.class_names, "input_size": list(p.input_size),
                "sha256": self.sha256.get(p.name),
                "val_accuracy": None if math.isnan(accuracy) else accuracy,
            })
        return models


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refused unless it stays inside ``folder`` (symlinks resolved): a
    manifest names files to load and to show every visitor, never others on the machine."""
    relative = Path(name)
    target = folder / relative
    if relative.is_absolute() or ".." in relative.parts or \
            not target.resolve().is_relative_to(folder.resolve()):
        raise CatalogError(f"'{folder / 'manifest.json'}' names {what} '{name}' outside "
                           f"'{folder}'; entries must be paths inside the models folder")
    return target


def read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise CatalogError(f"models folder '{folder}' does not exist "
                           "(train and export first: python -m training.run && python -m export.run)")
    path = folder / "manifest.json"
    if not path.is_file():
        raise CatalogError(f"no manifest.json in '{folder}' (write one with python -m export.run)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CatalogError(f"'{path}' is not readable JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), list):
        raise CatalogError(f"'{path}' has no \"models\" list")
    return manifest


def load_catalog(folder: str | os.PathLike, precision: str = "fp32",
                 threads: int | None = None) -> Catalog:
    """Load every model of ``precision`` listed in ``folder``/manifest.json, checked and warmed up."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    entries = [e for e in manifest["models"]
               if isinstance(e, dict) and e.get("precision", "fp32") == precision]
    if not entries:
        hint = " (export them with python -m export.run --quantize int8)" if precision == "int8" else ""
        raise CatalogError(f"no {precision} models listed in '{folder / 'manifest.json'}'{hint}")
    # Every path (of either precision) is checked before anything is loaded.
    for e in manifest["models"]:
        if isinstance(e, dict) and isinstance(e.get("file"), str):
            inside(folder, e["file"], "the model file")
    paths = [folder / e["file"] if isinstance(e.get("file"), str) else None for e in entries]
    examples = [inside(folder, name, "the example") for name in manifest.get("examples", [])
                if isinstance(name, str)]
    examples = [path for path in examples if path.is_file()]
    predictors = []
    for entry, path in zip(entries, paths):
        if path is None:
            raise CatalogError(f"a model entry in '{folder / 'manifest.json'}' has no \"file\"")
        try:
            predictor = Predictor(path, threads=threads)
            # One run at start: a file that loads but cannot run fails here, not on a user's
            # request, and the first request does not pay for ONNX Runtime's lazy set-up.
            predictor.predict(Image.new("RGB", predictor.input_size[::-1]))
        except ModelFileError as exc:
            raise CatalogError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any ONNX Runtime failure is a bad model file
            raise CatalogError(f"'{path}' cannot run: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        if predictor.precision != precision:
            raise CatalogError(f"'{predictor.path}' is {predictor.precision}, "
                               f"but the manifest lists it as {precision}")
        predictors.append(predictor)
    first = predictors[0]
    for other in predictors[1:]:
        if other.class_names != first.class_names:
            raise CatalogError(f"models disagree on class names: {first.name} has {first.class_names}, "
                               f"{other.name} has {other.class_names}")
    return Catalog(folder, precision, predictors, examples,
                   {p.name: sha256_of(p.path) for p in predictors})

"""The models a folder offers: read its manifest.json, load each listed .onnx file once.

The manifest (written by ``python -m export.run``) says which files to load and where the
example images are; everything about a model itself (class names, input size, display name,
precision) is read back from the .onnx file's metadata by the Predictor. Which engine and
precision run each file is the caller's choice, or measured at load (serve.engine_choice).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

import imaging
from common.errors import UserError
from common.files import sha256_of
from serve import engine_choice
from serve.predictor import ENGINES, Predictor, available_engines, engine_precisions

# What --precision may ask for, and which exported file each one runs: bf16 computes the FP32
# file in bfloat16; auto is fp32 or bf16, whichever is faster here and faithful (INT8 is a
# different file with its own accuracy trade-off, so it is served only when asked for).
PRECISIONS = ("auto", "fp32", "bf16", "int8")
FILE_PRECISION = {"auto": "fp32", "fp32": "fp32", "bf16": "fp32", "int8": "int8"}
ENGINE_CHOICES = ("auto", *ENGINES)
CHECK_VALIDATION_IMAGES = 32  # validation images the export copies for serve.app's fidelity check


class CatalogError(UserError):
    """A models folder that cannot be served, with a one-line reason."""


@dataclass
class Catalog:
    folder: Path
    precision: str
    predictors: list[Predictor]
    examples: list[Path] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # model name -> the served file's

    engine: str = "onnxruntime"  # what was asked for: auto or an engine

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
                "engine": p.engine, "file_precision": p.file_precision, "engine_choice": p.choice,
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


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine and --precision, the same for serve.app, serve.predict and serve.evaluate. Their
    defaults may be set for a whole deployment (or a test run) with RESNET_TRIO_ENGINE and
    RESNET_TRIO_PRECISION."""
    engine = os.environ.get("RESNET_TRIO_ENGINE", "auto")
    precision = os.environ.get("RESNET_TRIO_PRECISION", "auto")
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default=engine,
                        help="what runs the models: auto times every installed engine at start-up "
                             "and keeps, per model, the fastest that stays faithful to ONNX Runtime "
                             f"(default: {engine})")
    parser.add_argument("--precision", choices=PRECISIONS, default=precision,
                        help="fp32 or int8: which exported file; bf16: the FP32 file computed in "
                             "bfloat16 (OpenVINO on CPUs with AVX-512 BF16 or AMX); auto: fp32 or "
                             f"bf16, whichever --engine chooses (default: {precision})")


def candidate_pairs(engine: str, precision: str) -> list[tuple[str, str]]:
    """The (engine, precision) pairs that may serve a file for ``--engine``/``--precision``."""
    if engine not in ENGINE_CHOICES:
        raise CatalogError(f"unknown engine '{engine}' (choose from {', '.join(ENGINE_CHOICES)})")
    if precision not in PRECISIONS:
        raise CatalogError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    engines = available_engines() if engine == "auto" else [engine]
    pairs = [(e, p) for e in engines for p in engine_precisions(e, FILE_PRECISION[precision])
             if precision == "auto" or p == precision]
    if not pairs:
        why = ("bf16 needs OpenVINO (pip install '.[openvino]') and a CPU with AVX-512 BF16 or AMX"
               if precision == "bf16" else f"{engine} does not run {precision}")
        raise CatalogError(f"no engine can serve --precision {precision} with --engine {engine} "
                           f"here: {why}")
    return pairs


def check_images(paths: list[Path]) -> list[Image.Image]:
    """The images fidelity is checked on (the examples and the manifest's check images, copies
    of validation images inside the models folder): each distinct, decodable image once."""
    images, seen = [], set()
    for path in paths:
        try:
            digest = sha256_of(path)  # the examples are copies of validation images too
            if digest not in seen:
                images.append(imaging.load_rgb(path, imaging.SERVING_MAX_PIXELS))
                seen.add(digest)
        except (imaging.ImageError, OSError):
            continue
    return images


def load_catalog(folder: str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                 engine: str = "onnxruntime",
                 log: Callable[[str], None] = engine_choice.stderr) -> Catalog:
    """Load every model listed in ``folder``/manifest.json of the file ``precision`` runs on,
    checked and warmed up, on ``engine`` at ``precision`` (``auto``: chosen by measurement,
    per model, see serve.engine_choice; the figures go to ``log`` and each ``choice``)."""
    folder = Path(folder)
    pairs = candidate_pairs(engine, precision)
    file_precision = FILE_PRECISION[precision]
    manifest = read_manifest(folder)
    entries = [e for e in manifest["models"]
               if isinstance(e, dict) and e.get("precision", "fp32") == file_precision]
    if not entries:
        hint = " (export them with python -m export.run --quantize int8)" if file_precision == "int8" else ""
        raise CatalogError(f"no {file_precision} models listed in '{folder / 'manifest.json'}'{hint}")
    # Every path (of either precision) is checked before anything is loaded.
    for e in manifest["models"]:
        if isinstance(e, dict) and isinstance(e.get("file"), str):
            inside(folder, e["file"], "the model file")
    paths = [folder / e["file"] if isinstance(e.get("file"), str) else None for e in entries]
    examples = [inside(folder, name, "the example") for name in manifest.get("examples", [])
                if isinstance(name, str)]
    examples = [path for path in examples if path.is_file()]
    check_paths = [inside(folder, name, "the check image") for name in manifest.get("check_images", [])
                   if isinstance(name, str)]
    checks = check_images(examples + check_paths) if len(pairs) > 1 else []
    predictors = []
    for entry, path in zip(entries, paths):
        if path is None:
            raise CatalogError(f"a model entry in '{folder / 'manifest.json'}' has no \"file\"")
        try:
            predictor = engine_choice.choose(path, pairs, checks, threads, log)
            # One run at start: a file that loads but cannot run fails here, not on a user's
            # request, and the first request does not pay for the engine's lazy set-up.
            predictor.predict(Image.new("RGB", predictor.input_size[::-1]))
        except UserError as exc:
            raise CatalogError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any engine failure is a bad model file
            raise CatalogError(f"'{path}' cannot run: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        if predictor.file_precision != file_precision:
            raise CatalogError(f"'{predictor.path}' is {predictor.file_precision}, "
                               f"but the manifest lists it as {file_precision}")
        predictors.append(predictor)
    first = predictors[0]
    for other in predictors[1:]:
        if other.class_names != first.class_names:
            raise CatalogError(f"models disagree on class names: {first.name} has {first.class_names}, "
                               f"{other.name} has {other.class_names}")
    return Catalog(folder, file_precision, predictors, examples,
                   {p.name: sha256_of(p.path) for p in predictors}, engine)

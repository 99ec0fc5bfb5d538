"""Exported ONNX files -> a Triton Inference Server model repository.

One folder per model, in the layout Triton loads with ``--model-repository``::

    <repo>/<model>/config.pbtxt     backend onnxruntime, inputs/outputs, batching
    <repo>/<model>/labels.txt       class names, one a line, for the classification extension
    <repo>/<model>/1/model.onnx     the exported file, unchanged (its metadata travels with it)

Names, data types and shapes are read from each ONNX graph itself, so the config cannot drift
from the model. ``python -m export.triton --models models --out triton`` converts an existing
export; ``python -m export.run --triton DIR`` writes the repository as part of an export.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import onnx

from common.errors import UserError, run_cli
from common.files import atomic_folder
from common.tensor_names import DATATYPES, MODEL_VERSION, model_name

MAX_BATCH_SIZE = 32  # Triton batches concurrent requests up to this many images
QUEUE_DELAY_US = 2000  # how long a request may wait for others to join its batch
LABELS_FILE = "labels.txt"
LABELLED_OUTPUT = "probabilities"  # the output Triton can turn into "score:index:label" strings

# onnx.TensorProto element type -> Triton data type name (the protocol's name, "TYPE_"-prefixed).
TRITON_TYPES = {getattr(onnx.TensorProto, onnx_name): f"TYPE_{datatype}"
                for onnx_name, datatype in DATATYPES.items()}


class TritonError(UserError):
    """A model that cannot go into a Triton repository, with a one-line reason."""


def tensor_spec(value: onnx.ValueInfoProto, path: Path) -> tuple[str, str, list[int]]:
    """(name, Triton data type, dims without the batch dimension) of one graph input/output."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in TRITON_TYPES:
        raise TritonError(f"'{path}': {value.name} has an element type Triton's ONNX backend "
                          f"is not mapped for ({onnx.TensorProto.DataType.Name(tensor.elem_type)})")
    dims = list(tensor.shape.dim)
    if not dims or dims[0].HasField("dim_value"):
        raise TritonError(f"'{path}': {value.name} has no dynamic batch dimension")
    rest = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
    return value.name, TRITON_TYPES[tensor.elem_type], rest


def _tensor_block(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    return (f"  {{\n    name: \"{name}\"\n    data_type: {dtype}\n"
            f"    dims: [ {', '.join(map(str, dims))} ]\n{extra}  }}")


def model_config(name: str, model: onnx.ModelProto, path: Path) -> str:
    """The config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    inputs = [tensor_spec(v, path) for v in model.graph.input]
    outputs = [tensor_spec(v, path) for v in model.graph.output]
    input_blocks = ",\n".join(_tensor_block(*spec) for spec in inputs)
    output_blocks = ",\n".join(
        _tensor_block(*spec, f"    label_filename: \"{LABELS_FILE}\"\n" if spec[0] == LABELLED_OUTPUT else "")
        for spec in outputs
    )
    return (
        f"# Written by python -m export.triton from {path.name}.\n"
        f"name: \"{name}\"\n"
        "platform: \"onnxruntime_onnx\"\n"
        "backend: \"onnxruntime\"\n"
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        f"input [\n{input_blocks}\n]\n"
        f"output [\n{output_blocks}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
    )


def class_names_of(model: onnx.ModelProto, path: Path) -> list[str]:
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        return list(json.loads(meta["class_names"]))
    except (KeyError, ValueError):
        raise TritonError(f"'{path}' has no class_names metadata (export it with python -m export.run)") from None


def add_model(onnx_path: Path, repo: Path, name: str | None = None) -> Path:
    """Put one exported ONNX file into the repository; returns the model's folder."""
    onnx_path = Path(onnx_path)
    name = name or model_name(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise TritonError(f"cannot read '{onnx_path}': {str(exc).splitlines()[0]}") from None
    config = model_config(name, model, onnx_path)
    labels = class_names_of(model, onnx_path)
    # Build next to the final folder, then swap it in: a reader never sees half a model.
    folder = Path(repo) / name
    with atomic_folder(folder) as tmp:
        (tmp / MODEL_VERSION).mkdir()
        shutil.copyfile(onnx_path, tmp / MODEL_VERSION / "model.onnx")
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        (tmp / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    return folder


def write_repository(models_dir: Path, repo: Path, names: list[str] | None = None) -> list[Path]:
    """Every model of an export folder's manifest (or just ``names``) into ``repo``."""
    manifest_path = Path(models_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise TritonError(f"'{manifest_path}' does not exist; export first with python -m export.run")
    entries = json.loads(manifest_path.read_text())["models"]
    if names is not None:
        entries = [e for e in entries if e["name"] in names]
    Path(repo).mkdir(parents=True, exist_ok=True)
    # Named after the file: unique even when one architecture is exported at two precisions.
    return [add_model(Path(models_dir) / e["file"], Path(repo)) for e in entries]


def main(argv=None) -> int:
    return run_cli(lambda: write(argv))


def write(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton",
                                     description="Write a Triton model repository from exported ONNX models.")
    parser.add_argument("--models", default="models", help="export folder with manifest.json (default: models)")
    parser.add_argument("--out", default="triton", help="model repository to write (default: triton)")
    args = parser.parse_args(argv)
    folders = write_repository(Path(args.models), Path(args.out))
    print(f"Wrote {len(folders)} model(s) to the Triton repository {args.out}/: "
          + ", ".join(f.name for f in folders), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

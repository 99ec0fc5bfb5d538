"""What an exported model and its tensors are called outside this project, torch- and onnx-free.

The Triton model repository (``export/triton.py``) and the Open Inference Protocol the server
speaks (``serve/inference_protocol.py``) both take their model names, version and data types
from here, so a client written for one works against the other unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

MODEL_VERSION = "1"  # the repository's one version folder, <repo>/<model>/1/model.onnx

# ONNX element type name (onnx.TensorProto.DataType.Name) -> the protocol's data type.
# Triton's config.pbtxt spells the same types "TYPE_" + this.
DATATYPES = {
    "FLOAT": "FP32",
    "FLOAT16": "FP16",
    "DOUBLE": "FP64",
    "INT64": "INT64",
    "INT32": "INT32",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
}


def model_name(onnx_path: str | os.PathLike) -> str:
    """A served file's name: resnet34.onnx -> resnet34, resnet34.int8.onnx -> resnet34_int8."""
    return Path(onnx_path).stem.replace(".", "_")


def datatype_of(onnxruntime_type: str) -> str | None:
    """The protocol's data type of an ONNX Runtime tensor type ("tensor(float)" -> "FP32"),
    None for a type outside the table."""
    inner = onnxruntime_type.removeprefix("tensor(").removesuffix(")").upper()
    return DATATYPES.get(inner)


def shape_of(onnxruntime_shape: list) -> list[int]:
    """Dims as the protocol and Triton's metadata state them: a named (dynamic) dim is -1."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in onnxruntime_shape]

"""The Open Inference Protocol (KServe's "v2" REST protocol, as Triton speaks it) for the served
ONNX files, on the same server and port as the page and the plain HTTP API.

    GET  /v2                                    server metadata (name, version, extensions)
    GET  /v2/health/live                        200 while the process serves
    GET  /v2/health/ready                       200 once every model is loaded, else 400
    GET  /v2/models/{name}[/versions/1]         model metadata: inputs and outputs
    GET  /v2/models/{name}[/versions/1]/ready   200 when the model can infer, else 4xx
    POST /v2/models/{name}[/versions/1]/infer   typed tensors in, the requested outputs out

Model names, the version, tensor names, shapes and data types are the Triton repository's
(``python -m export.triton``; both read them from the ONNX graph through common/tensor_names),
so a client written once runs against this server and against Triton serving that repository.
The input ``image`` is the already-preprocessed FP32 batch [N, 3, H, W] (the model file's own
input; ``Predictor.preprocess`` makes it from an image). Tensors travel as JSON, or in the
binary tensor data extension (``Inference-Header-Content-Length``: a JSON header, then the raw
little-endian bytes), which ``tritonclient.http`` uses by default.

Limits: at most ``Limits.max_batch`` images a request (the batch dimension), every other
dimension exactly the model's, and a body of at most what that batch takes as JSON numbers.
Errors are ``{"error": "..."}``: 400 for a malformed request, 404 for an unknown model or
version, 413 above the body limit, 415 for a compressed body, 503 with Retry-After when the
line is full. Inference runs inside the app's concurrency gate, like every other door.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from dataclasses import dataclass


import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from common.tensor_names import MODEL_VERSION, datatype_of, model_name, shape_of
from serve.predictor import Predictor
from serve.service import Busy, Cancel, ClassifyError, Service

MAX_BATCH = 8  # images a request may carry; the batch dimension's upper bound
JSON_BYTES_PER_VALUE = 26  # the longest float written in full, "-1.2345678901234567e-100, "
HEADER_BYTES = 64 * 1024  # the JSON around the tensors: names, shapes, parameters
BINARY_HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
# The protocol's data types as little-endian numpy dtypes (the binary extension's byte order).
NUMPY_TYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4",
               "INT8": "i1", "UINT8": "u1", "BOOL": "?"}

@dataclass(frozen=True)
class Limits:
    max_batch: int = MAX_BATCH

    def body_bytes(self, values_per_image: int) -> int:
        """The largest request body for a model: a full batch written as JSON numbers."""
        return self.max_batch * values_per_image * JSON_BYTES_PER_VALUE + HEADER_BYTES


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]  # -1 where the graph leaves the dimension open (the batch)

    def describe(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass
class ServedModel:
    name: str
    predictor: Predictor
    inputs: list[Tensor]
    outputs: list[Tensor]

    @classmethod
    def of(cls, predictor: Predictor) -> "ServedModel":
        def tensors(args) -> list[Tensor]:
            return [Tensor(name, datatype_of(kind) or kind, shape_of(shape)) for name, kind, shape in args]

        inputs, outputs = predictor.signature  # the file's, whichever engine runs it
        return cls(model_name(predictor.path), predictor, tensors(inputs), tensors(outputs))

    @property
    def values_per_image(self) -> int:
        return math.prod(d for d in self.inputs[0].shape[1:] if d > 0)

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [t.describe() for t in self.inputs],
                "outputs": [t.describe() for t in self.outputs]}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) of a request body."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise ProtocolError(400, f"{BINARY_HEADER} must be a byte count within the body's "
                                 f"{len(body)} bytes, got '{header_length[:40]}'")
    size = int(header_length)
    return body[:size], memoryview(body)[size:]


def parse_request(header: bytes) -> dict:
    try:
        request = json.loads(header)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise ProtocolError(400, "the request is not a valid JSON inference request") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "the request must be a JSON object with \"inputs\"")
    if "id" in request and not isinstance(request["id"], str):
        raise ProtocolError(400, "\"id\" must be a string")
    if not isinstance(request.get("parameters", {}), dict):
        raise ProtocolError(400, "\"parameters\" must be an object")
    return request


def read_inputs(model: ServedModel, request: dict, binary: memoryview, limits: Limits) -> dict:
    """{input name: numpy array}, every input checked against the model's before it is read."""
    given = request.get("inputs")
    if not isinstance(given, list) or not all(isinstance(i, dict) for i in given):
        raise ProtocolError(400, "\"inputs\" must be a list of tensor objects")
    expected = {t.name: t for t in model.inputs}
    names = [i.get("name") for i in given]
    for name in names:
        if not isinstance(name, str) or name not in expected:
            raise ProtocolError(400, f"unknown input '{str(name)[:80]}' for model '{model.name}'; "
                                     f"its inputs: {', '.join(expected)}")
    if sorted(names) != sorted(expected):
        raise ProtocolError(400, f"model '{model.name}' takes exactly the inputs "
                                 f"{', '.join(expected)}, got {', '.join(map(str, names)) or 'none'}")
    arrays, offset = {}, 0
    for tensor in given:
        spec = expected[tensor["name"]]
        shape = checked_shape(spec, tensor.get("shape"), limits)
        if tensor.get("datatype") != spec.datatype:
            raise ProtocolError(400, f"input '{spec.name}' has datatype {spec.datatype}, "
                                     f"got {str(tensor.get('datatype'))[:20]}")
        parameters = tensor.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ProtocolError(400, f"input '{spec.name}': \"parameters\" must be an object")
        if any(key.startswith("shared_memory") for key in parameters):
            raise ProtocolError(400, "shared-memory tensors are not supported; send the data")
        dtype = np.dtype(NUMPY_TYPES[spec.datatype])
        count = math.prod(shape)
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if type(size) is not int or size != count * dtype.itemsize:  # not bool, not 12.0
                raise ProtocolError(400, f"input '{spec.name}' of shape {shape} takes "
                                         f"{count * dtype.itemsize} bytes, binary_data_size says {size}")
            if offset + size > len(binary):
                raise ProtocolError(400, f"input '{spec.name}': the body ends before its {size} bytes")
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        elif "data" in tensor:
            array = json_tensor(spec, tensor["data"], shape, dtype)
        else:
            raise ProtocolError(400, f"input '{spec.name}' has neither \"data\" nor binary_data_size")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError(400, f"input '{spec.name}' holds NaN or infinite values")
        arrays[spec.name] = array
    if offset != len(binary):
        raise ProtocolError(400, f"the body has {len(binary) - offset} bytes after the inputs' binary data")
    return arrays


def checked_shape(spec: Tensor, shape, limits: Limits) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(400, f"input '{spec.name}': \"shape\" must be a list of integers")
    fits = len(shape) == len(spec.shape) and all(d == s for d, s in zip(shape[1:], spec.shape[1:]) if s != -1)
    if not fits or min(shape, default=0) < 1:
        raise ProtocolError(400, f"input '{spec.name}' has shape {spec.shape} (-1: any), got {shape[:8]}")
    if shape[0] > limits.max_batch:
        raise ProtocolError(400, f"input '{spec.name}': batch of {shape[0]} above this server's "
                                 f"maximum of {limits.max_batch}; split the request")
    return shape


def json_tensor(spec: Tensor, data, shape: list[int], dtype: np.dtype) -> np.ndarray:
    """The "data" of a JSON tensor (flat or nested, row-major) as an array of ``shape``."""
    try:
        array = np.asarray(data)
    except ValueError:  # ragged nesting
        array = None
    kinds = "fiu" if dtype.kind == "f" else ("iu" if dtype.kind in "iu" else "b")
    if array is None or array.dtype.kind not in kinds:
        raise ProtocolError(400, f"input '{spec.name}': \"data\" must be a list of {spec.datatype} numbers")
    if array.size != math.prod(shape):
        raise ProtocolError(400, f"input '{spec.name}' of shape {shape} takes {math.prod(shape)} "
                                 f"values, \"data\" has {array.size}")
    return array.reshape(shape).astype(dtype)


def requested_outputs(model: ServedModel, request: dict) -> list[tuple[Tensor, bool]]:
    """(output, as binary?) for every output the request asks for (all of them by default)."""
    default_binary = request.get("parameters", {}).get("binary_data_output", False) is True
    outputs = {t.name: t for t in model.outputs}
    asked = request.get("outputs")
    if asked is None:
        return [(t, default_binary) for t in model.outputs]
    if not isinstance(asked, list) or not asked or not all(isinstance(o, dict) for o in asked):
        raise ProtocolError(400, "\"outputs\" must be a non-empty list of {\"name\": ...} objects")
    chosen = []
    for item in asked:
        name, parameters = item.get("name"), item.get("parameters", {})
        if not isinstance(name, str) or name not in outputs:
            raise ProtocolError(400, f"unknown output '{str(name)[:80]}' for model '{model.name}'; "
                                     f"its outputs: {', '.join(outputs)}")
        if any(t.name == name for t, _ in chosen):
            raise ProtocolError(400, f"output '{name}' is requested twice")
        if not isinstance(parameters, dict):
            raise ProtocolError(400, f"output '{name}': \"parameters\" must be an object")
        if "classification" in parameters or any(k.startswith("shared_memory") for k in parameters):
            raise ProtocolError(400, f"output '{name}': the classification and shared-memory "
                                     "extensions are not supported; read the tensor itself")
        chosen.append((outputs[name], parameters.get("binary_data", default_binary) is True))
    return chosen


def infer(model: ServedModel, limits: Limits, body: bytes, header_length: str | None,
          cancel: Cancel | None = None) -> Response:
    """One inference request's body -> its response (run by the service: in a worker, inside
    the gate, under the deadline)."""
    header, binary = split_body(body, header_length)
    request = parse_request(header)
    inputs = read_inputs(model, request, binary, limits)
    wanted = requested_outputs(model, request)
    results = model.predictor.run([t.name for t, _ in wanted], inputs[model.inputs[0].name],
                                  cancel.run_options if cancel else None)
    response = {"model_name": model.name, "model_version": MODEL_VERSION}
    if "id" in request:
        response["id"] = request["id"]
    response["outputs"], chunks = [], []
    for (tensor, as_binary), array in zip(wanted, results):
        out = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape)}
        if as_binary:
            chunks.append(np.ascontiguousarray(array, dtype=NUMPY_TYPES[tensor.datatype]).tobytes())
            out["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            out["data"] = array.ravel().tolist()
        response["outputs"].append(out)
    text = json.dumps(response, allow_nan=False).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(b"".join([text, *chunks]), media_type="application/octet-stream",
                    headers={BINARY_HEADER: str(len(text))})


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def server_version() -> str:
    try:
        return importlib.metadata.version("resnet-trio")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


async def read_body(request: Request, limit: int) -> bytes:
    too_large = ProtocolError(413, f"request body above this model's limit of {limit:,} bytes")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, received = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked body has no length
        received += len(chunk)
        if received > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_router(service: Service, limits: Limits = Limits()) -> APIRouter:
    """The protocol's routes for the service's models: inference runs as every door's does
    (``Service.run``: the shared gate, the deadline); readiness is the service's."""
    models = {m.name: m for m in map(ServedModel.of, service.catalog.predictors)}

    def ready() -> bool:
        return service.problem() is None
    router = APIRouter(prefix="/v2", include_in_schema=False)

    def find(name: str, version: str | None) -> ServedModel:
        if name not in models:
            raise ProtocolError(404, f"unknown model '{name[:80]}'; served: {', '.join(models)}")
        if version is not None and version != MODEL_VERSION:
            raise ProtocolError(404, f"model '{name}' has no version '{version[:20]}'; "
                                     f"versions: {MODEL_VERSION}")
        return models[name]

    @router.get("")
    async def server_metadata():
        return {"name": "resnet-trio", "version": server_version(), "extensions": EXTENSIONS}

    @router.get("/health/live")
    async def live():
        return {"live": True}

    @router.get("/health/ready")
    async def server_ready():
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 400)

    async def metadata(name: str, version: str | None = None):
        try:
            return find(name, version).metadata()
        except ProtocolError as exc:
            return error(exc.status, str(exc))

    async def model_ready(name: str, version: str | None = None):
        try:
            find(name, version)
        except ProtocolError as exc:
            return error(exc.status, str(exc))
        return JSONResponse({"name": name, "ready": ready()}, status_code=200 if ready() else 400)

    async def infer_route(name: str, request: Request, version: str | None = None):
        try:
            model = find(name, version)
            if request.headers.get("content-encoding", "identity").lower() != "identity":
                raise ProtocolError(415, "compressed request bodies are not accepted; send it uncompressed")
            body = await read_body(request, limits.body_bytes(model.values_per_image))
            return await service.run(infer, model, limits, body, request.headers.get(BINARY_HEADER))
        except ProtocolError as exc:
            return error(exc.status, str(exc))
        except Busy as exc:
            return error(503, str(exc), {"Retry-After": str(exc.retry_after)})
        except ClassifyError as exc:  # past the deadline
            return error(exc.status, str(exc), {"Retry-After": "1"} if exc.status == 503 else None)

    for path in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(path, metadata, methods=["GET"])
        router.add_api_route(path + "/ready", model_ready, methods=["GET"])
        router.add_api_route(path + "/infer", infer_route, methods=["POST"])
    return router

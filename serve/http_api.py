"""A plain HTTP API beside the Gradio page, on the same server and port (FastAPI).

    POST /api/v1/classify   one image (multipart field "file", or the raw body with an image/*
                            content type) -> {"results": [one /classify result per model]}
    GET  /api/v1/models     the served models and their metadata
    GET  /healthz           200 while the process serves
    GET  /readyz            200 once every model is loaded and warmed and the queue runs, else 503
    GET  /api/v1/openapi.json   the OpenAPI schema of these routes

Errors are {"error": "..."}: 400 for a file that is not a usable image (the page's message),
413 above the upload limit, 415 for a body that is neither, 503 with Retry-After when the
line is full, 500 (logged, never a traceback) for anything else. Classification shares the
page's concurrency limit (serve/gate.py).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from serve.catalog import Catalog
from serve.gate import Gate, QueueFull
from serve.guard import UploadsOnly
from serve.ui import NO_IMAGE, ClassifyError, classify_source

log = logging.getLogger("serve")
SPOOL_BYTES = 1 << 20  # a raw body above this waits on disk, not in memory


class Result(BaseModel):
    model: str
    display_name: str
    precision: str
    top_class: str
    confidences: dict[str, float]
    milliseconds: float


class Results(BaseModel):
    results: list[Result]


class Model(BaseModel):
    name: str
    display_name: str
    precision: str
    class_names: list[str]
    input_size: list[int]  # [height, width]
    sha256: Optional[str]
    val_accuracy: Optional[float]
    engine: str = "onnxruntime"  # what runs it: onnxruntime or openvino
    file_precision: str = "fp32"  # the served file's: fp32 or int8 (precision: what it computes in)
    engine_choice: Optional[dict] = None  # how --engine auto chose, with its timings and fidelity


class Models(BaseModel):
    models: list[Model]


class Problem(BaseModel):
    error: str


class Status(BaseModel):
    status: str


class TooLarge(Exception):
    pass


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def limited(request: Request, limit: int) -> Request:
    """The same request, raising TooLarge once more than ``limit`` body bytes have arrived
    (a chunked upload has no Content-Length to check first)."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise TooLarge
        return message

    return Request(request.scope, receive)


IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "image/jpeg": IMAGE_BODY, "image/png": IMAGE_BODY, "image/webp": IMAGE_BODY,
    "image/*": IMAGE_BODY}}}
ERRORS = {400: {"model": Problem, "description": "not a usable image"},
          413: {"model": Problem, "description": "above the upload limit"},
          415: {"model": Problem, "description": "neither multipart nor an image body"},
          503: {"model": Problem, "description": "the line is full; see Retry-After"}}


def create_app(catalog: Catalog, gate: Gate, max_pixels: int, max_upload_bytes: int) -> FastAPI:
    """The FastAPI app the Gradio page is then mounted on (gr.mount_gradio_app)."""
    state = {"ready": False}

    app = FastAPI(title="ResNet-34 trio", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url=None, redoc_url=None,
                  description="Classify an image with every served model; the same results "
                              "as the page's /classify.")
    app.add_middleware(UploadsOnly)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return error(500, "internal error; see the server log")

    @app.get("/healthz", response_model=Status, summary="200 while the process serves")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Status, responses={503: {"model": Problem}},
             summary="200 once the models are loaded and warmed, else 503")
    async def readyz():
        if not state["ready"]:
            return error(503, "starting")
        return {"status": "ready"}

    @app.get("/api/v1/models", response_model=Models, summary="The served models")
    async def models():
        return {"models": catalog.describe()}

    @app.post("/api/v1/classify", response_model=Results, responses=ERRORS, openapi_extra=CLASSIFY_BODY,
              summary="Classify one image with every served model")
    async def classify(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes:
            return error(413, f"upload above the limit of {max_upload_bytes:,} bytes")
        if gate.full():  # before the body is read: a busy server does not take the upload
            return error(503, "the server is busy; retry later", {"Retry-After": str(gate.retry_after())})
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        async with contextlib.AsyncExitStack() as stack:
            try:
                if kind == "multipart/form-data":
                    form = await stack.enter_async_context(
                        limited(request, max_upload_bytes).form(max_files=1, max_fields=8))
                    upload = form.get("file")
                    if upload is None or isinstance(upload, str):
                        return error(400, f"{NO_IMAGE.split('(')[0].strip()}: send it as the "
                                          "multipart field 'file'")
                    source = upload.file
                elif kind.startswith("image/") or kind == "application/octet-stream":
                    source = stack.enter_context(tempfile.SpooledTemporaryFile(SPOOL_BYTES))
                    async for chunk in limited(request, max_upload_bytes).stream():
                        source.write(chunk)
                    if source.tell() == 0:
                        return error(400, "Cannot classify this file: empty file (0 bytes).")
                    source.seek(0)
                else:
                    return error(415, "send the image as the multipart field 'file' or as the raw "
                                      "body with an image/* content type")
            except TooLarge:
                return error(413, f"upload above the limit of {max_upload_bytes:,} bytes")
            try:
                async with gate.slot(turn_away_when_full=True):
                    results = await anyio.to_thread.run_sync(classify_source, catalog, source, max_pixels)
            except QueueFull as exc:
                return error(503, str(exc), {"Retry-After": str(exc.retry_after)})
            except ClassifyError as exc:
                return error(exc.status, str(exc))
        return JSONResponse({"results": results})

    app.state.serving = state
    return app


def mark_ready_when_started(app: FastAPI) -> None:
    """Wrap the app's lifespan (after gr.mount_gradio_app has added the queue's start to it):
    /readyz says ready from the moment the queue runs until shutdown begins."""
    inner = app.router.lifespan_context
    state = app.state.serving

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with inner(a) as value:
            state["ready"] = True
            try:
                yield value
            finally:
                state["ready"] = False

    app.router.lifespan_context = lifespan

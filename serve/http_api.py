"""A plain HTTP API beside the Gradio page, on the same server and port (FastAPI).

    POST /api/v1/classify   one image (multipart field "file", or the raw body with an image/*
                            content type) -> {"results": [one /classify result per model]}
    GET  /api/v1/models     the served models and their metadata
    GET  /healthz           200 while the process serves (liveness)
    GET  /readyz            200 while it should get traffic; 503 once it is stopping or a request
                            has run past the deadline (readiness)
    GET  /api/v1/openapi.json   the OpenAPI schema of these routes, its result schema generated
                            from the service's own result model
    /v2/...                 the Open Inference Protocol (serve/inference_protocol.py)

Errors are {"error": "..."}: 400 for a file that is not a usable image (the page's message),
413 above the upload limit, 415 for a body that is neither, 503 with Retry-After when the
line is full or the request ran past the deadline, 500 (logged, never a traceback) for anything
else. Classification is the service's (serve/service.py): the page's concurrency limit and
deadline. Imports no Gradio: the page is mounted on this app by serve/app.py.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from serve import inference_protocol
from serve.access_log import AccessLog
from serve.guard import SPOOL_BYTES, Guard, UploadFolder
from serve.service import NO_IMAGE, Busy, ClassifyError, ModelResult, Service

log = logging.getLogger("serve")


class Results(BaseModel):
    results: list[ModelResult]


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


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "image/jpeg": IMAGE_BODY, "image/png": IMAGE_BODY, "image/webp": IMAGE_BODY,
    "image/*": IMAGE_BODY}}}
ERRORS = {400: {"model": Problem, "description": "not a usable image"},
          413: {"model": Problem, "description": "above the upload limit"},
          415: {"model": Problem, "description": "neither multipart nor an image body"},
          503: {"model": Problem, "description": "the line is full, or the request ran past the "
                                                 "deadline; see Retry-After"}}


def create_app(service: Service, max_upload_bytes: int, upload_folder: UploadFolder | None = None,
               body_seconds: float | None = None) -> FastAPI:
    """The FastAPI app the Gradio page is then mounted on (gr.mount_gradio_app); the guard and
    the access log wrap every route, the page's included."""
    catalog, gate = service.catalog, service.gate
    app = FastAPI(title="ResNet-34 trio", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url=None, redoc_url=None,
                  description="Classify an image with every served model; the same results "
                              "as the page's /classify.")
    guard = {"body_seconds": body_seconds} if body_seconds else {}
    app.add_middleware(Guard, upload_folder=upload_folder, max_upload_bytes=max_upload_bytes, **guard)
    app.add_middleware(AccessLog)  # outermost: refusals are logged too

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
             summary="200 while the server should get traffic, else 503 with the reason")
    async def readyz():
        problem = service.problem()
        if problem:
            return error(503, problem)
        return {"status": "ready"}

    @app.get("/api/v1/models", response_model=Models, summary="The served models")
    async def models():
        return {"models": catalog.describe()}

    @app.post("/api/v1/classify", response_model=Results, response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=CLASSIFY_BODY,
              summary="Classify one image with every served model")
    async def classify(request: Request):
        if gate.full():  # a busy server does not parse the upload
            return error(503, "the server is busy; retry later", {"Retry-After": str(gate.retry_after())})
        too_large = f"upload above the limit of {max_upload_bytes:,} bytes"
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        async with contextlib.AsyncExitStack() as stack:
            if kind == "multipart/form-data":
                form = await stack.enter_async_context(request.form(max_files=1, max_fields=8))
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    return error(400, f"{NO_IMAGE.split('(')[0].strip()}: send it as the "
                                      "multipart field 'file'")
                if upload.size is not None and upload.size > max_upload_bytes:
                    return error(413, too_large)
                source = upload.file
            elif kind.startswith("image/") or kind == "application/octet-stream":
                source = stack.enter_context(tempfile.SpooledTemporaryFile(SPOOL_BYTES))
                async for chunk in request.stream():  # already bounded by the guard
                    source.write(chunk)
                if source.tell() > max_upload_bytes:
                    return error(413, too_large)
                if source.tell() == 0:
                    return error(400, "Cannot classify this file: empty file (0 bytes).")
                source.seek(0)
            else:
                return error(415, "send the image as the multipart field 'file' or as the raw "
                                  "body with an image/* content type")
            try:
                classification = await service.classify(source)
            except Busy as exc:
                return error(503, str(exc), {"Retry-After": str(exc.retry_after)})
            except ClassifyError as exc:
                headers = {"Retry-After": "1"} if exc.status == 503 else None
                return error(exc.status, str(exc), headers)
        return JSONResponse({"results": [r.model_dump(exclude_none=True) for r in classification.results]})

    app.include_router(inference_protocol.create_router(service))  # /v2/...: the same service
    return app

"""One classification service for every door: the page, the HTTP API and the inference protocol.

A request is one gated call: ``Service.classify`` decodes the image once, runs every model and
(for the page) draws each model's heatmap over the image, inside one slot of the shared
concurrency gate and under the server's deadline. Nothing the client sends back is ever acted
on: the page gets everything it shows from this one call, so no request can make the server do
more than classify one image.

The deadline: a request still running after ``deadline_seconds`` is answered 503 and its slot
freed. Its ONNX Runtime runs are told to stop (``RunOptions.terminate``); a decode cannot be
interrupted, but it is bounded by the pixel limit. Work that outlives its deadline is counted:
while any is still running the service is not ready (``problem()``, used by /readyz), and while
twice as many such runs as the gate has slots are still going, new work is refused rather than
piled onto a machine that is already stuck.

Imports no Gradio: the HTTP API and the batch commands use it without the page.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import anyio
import numpy as np
import onnxruntime as ort
from PIL import Image
from pydantic import BaseModel, Field

import imaging
from imaging.heatmap import overlay
from serve.catalog import Catalog
from serve.gate import Gate, QueueFull

log = logging.getLogger("serve")
DEFAULT_DEADLINE_SECONDS = 30.0
NO_IMAGE = "Choose an image first (upload, paste or take a photo)."
PREVIEW_PIXELS = 320  # overlays are drawn on a copy this size (longer side), small images enlarged


class ModelResult(BaseModel):
    """One model's answer for one image: the API's result, and what the page shows."""

    model: str = Field(description="the model's file name stem, e.g. resnet34")
    display_name: str
    precision: str = Field(description="fp32 or int8: which exported file answered")
    top_class: str
    confidences: dict[str, float] = Field(description="every class's probability, in the model's class order")
    milliseconds: float = Field(description="the model's own run time")
    unsure: Optional[bool] = Field(
        None, description="true when the top probability is below the model's abstention threshold "
                          "(chosen on validation so that the predictions kept reach a target accuracy); "
                          "absent for files exported without one")
    heatmap: Optional[list[list[float]]] = Field(
        None, description="the top class's Grad-CAM map, h x w, scaled to [0, 1] by its maximum "
                          "(absent for files exported without heatmaps)")


class ClassifyError(Exception):
    """A request that gets no result: ``status`` 400 for the client's file, 500 for ours,
    503 for a request that ran past the deadline."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Busy(ClassifyError):
    """Turned away before any work was done (503, with a Retry-After in seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, 503)
        self.retry_after = retry_after


@dataclass
class Classification:
    results: list[ModelResult]
    overlays: list[Optional[Image.Image]] = field(default_factory=list)  # the page's pictures


class Cancel:
    """Tells a request's model runs to stop (ONNX Runtime checks the flag between operators)."""

    def __init__(self):
        self.run_options = ort.RunOptions()

    def set(self) -> None:
        self.run_options.terminate = True

    @property
    def is_set(self) -> bool:
        return self.run_options.terminate


class Work:
    """The worker-thread jobs in flight, with their start times (a job past its deadline
    stays here until its thread really returns)."""

    def __init__(self):
        self._started: dict[int, float] = {}
        self._overdue: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def begin(self) -> int:
        with self._lock:
            job = next(self._ids)
            self._started[job] = time.monotonic()
            return job

    def end(self, job: int) -> None:
        with self._lock:
            self._started.pop(job, None)
            self._overdue.discard(job)

    def abandon(self, job: int) -> None:
        with self._lock:
            if job in self._started:
                self._overdue.add(job)

    def overdue(self) -> int:
        with self._lock:
            return len(self._overdue)

    def oldest_seconds(self) -> float:
        with self._lock:
            return time.monotonic() - min(self._started.values()) if self._started else 0.0


class Service:
    def __init__(self, catalog: Catalog, gate: Gate, max_pixels: int = imaging.SERVING_MAX_PIXELS,
                 deadline_seconds: float = DEFAULT_DEADLINE_SECONDS):
        self.catalog = catalog
        self.gate = gate
        self.max_pixels = max_pixels
        self.deadline_seconds = deadline_seconds
        self.work = Work()
        self.draining = False  # set when the server has been told to stop (SIGTERM)

    def problem(self) -> str | None:
        """Why the server should not be sent new traffic now, or None when it is ready."""
        if self.draining:
            return "shutting down"
        if self.work.oldest_seconds() > self.deadline_seconds:
            return f"a request has been running for more than {self.deadline_seconds:g} s"
        return None

    async def run(self, fn: Callable, *args, turn_away_when_full: bool = True):
        """``fn(*args, cancel)`` in a worker thread, inside a gate slot, under the deadline."""
        if self.work.overdue() >= 2 * self.gate.limit:
            raise Busy("the server is still finishing requests that ran past the deadline; "
                       "retry later", retry_after=max(1, round(self.deadline_seconds)))
        try:
            async with self.gate.slot(turn_away_when_full=turn_away_when_full):
                cancel = Cancel()
                job = self.work.begin()

                def bounded():
                    try:
                        return fn(*args, cancel)
                    finally:
                        self.work.end(job)
                try:
                    with anyio.fail_after(self.deadline_seconds):
                        return await anyio.to_thread.run_sync(bounded, abandon_on_cancel=True)
                except TimeoutError:
                    cancel.set()
                    self.work.abandon(job)
                    log.error("a request ran past the %g s deadline and was abandoned", self.deadline_seconds)
                    raise ClassifyError(f"the request took longer than {self.deadline_seconds:g} s "
                                        "and was stopped; retry later", status=503) from None
        except QueueFull as exc:
            raise Busy(str(exc), exc.retry_after) from None

    async def classify(self, source, heatmap_class: str | None = None, overlays: bool = False,
                       turn_away_when_full: bool = True) -> Classification:
        """Every model's answer for one image file (path, bytes or file object), in the
        catalog's order; with ``overlays``, each model's heatmap of ``heatmap_class`` (default:
        its own top class) drawn over the image too. ClassifyError when there is no answer."""
        if source is None:
            raise ClassifyError(NO_IMAGE)
        if heatmap_class is not None and heatmap_class not in self.catalog.class_names:
            raise ClassifyError(f"unknown class '{heatmap_class[:100]}'")
        return await self.run(self.classify_now, source, heatmap_class, overlays,
                              turn_away_when_full=turn_away_when_full)

    def classify_now(self, source, heatmap_class: str | None, overlays: bool,
                     cancel: Cancel | None = None) -> Classification:
        """``classify`` in the calling thread, without the gate (the gate's worker runs it)."""
        try:
            image = imaging.load_rgb(source, self.max_pixels, imaging.SERVING_MAX_DECODE_BYTES)
        except (imaging.ImageError, OSError) as exc:
            raise ClassifyError(f"Cannot classify this file: {exc}.") from None
        options = cancel.run_options if cancel else None
        results, pictures = [], []
        preview = fit_preview(image) if overlays else None
        for model in self.catalog.predictors:
            try:
                prediction = model.predict(image, run_options=options)
            except Exception:  # noqa: BLE001 - log it here, tell the user one line
                if cancel is not None and cancel.is_set:
                    raise ClassifyError("stopped at the deadline", 503) from None
                log.exception("%s failed", model.name)
                raise ClassifyError(f"{model.display_name} failed on this image; see the server log.",
                                    status=500) from None
            heatmap = prediction.heatmap()
            results.append(ModelResult(
                model=model.name, display_name=model.display_name, precision=model.precision,
                top_class=prediction.top_class, confidences=prediction.probabilities,
                milliseconds=round(prediction.milliseconds, 3), unsure=prediction.unsure,
                heatmap=None if heatmap is None else np.round(heatmap, 4).tolist()))
            if overlays:
                chosen = prediction.heatmap(heatmap_class)
                pictures.append(None if chosen is None else overlay(preview, chosen))
        return Classification(results, pictures)


def fit_preview(image: Image.Image) -> Image.Image:
    """A copy whose longer side is PREVIEW_PIXELS, to draw a heatmap on."""
    scale = PREVIEW_PIXELS / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)

"""Batched classification of many files, shared by ``serve.predict`` and ``serve.evaluate``.

Files are decoded and resized (imaging.load_rgb + Preprocessing.pixels, exactly as the app
and training do) in a few worker processes, a bounded number of batches ahead, while this
process runs each model on whole batches (Predictor.run, whatever the engine). Only uint8 model inputs
cross the process boundary.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

import imaging
from common.cpu import usable_logical_cpus
from imaging.preprocessing import Preprocessing

if TYPE_CHECKING:  # not imported for real: the decoding workers import this module and
    from serve.predictor import Predictor  # need neither onnxruntime nor its start-up time


def default_batch_size() -> int:
    """Enough images per run to keep every core's share of a convolution busy."""
    return min(64, 8 * usable_logical_cpus())


def default_workers() -> int:
    """Decoding is a small share of a batch's time next to three models: half the cores,
    at most four, so ONNX Runtime keeps most of the machine."""
    return max(1, min(4, usable_logical_cpus() // 2))


def input_arrays(path: str, specs: Sequence[Preprocessing], max_pixels: int):
    """One file as each spec's H x W x 3 uint8 input, or the reason it cannot be used."""
    try:
        image = imaging.load_rgb(path, max_pixels, imaging.SERVING_MAX_DECODE_BYTES)
        return [spec.pixels(image) for spec in specs]
    except (imaging.ImageError, OSError) as exc:
        return str(exc)


def _input_arrays_of_many(job):
    paths, specs, max_pixels = job
    return [input_arrays(p, specs, max_pixels) for p in paths]


@dataclass
class Batch:
    paths: list[str]
    probabilities: dict[str, np.ndarray]  # model key -> len(paths) x classes
    failures: list[tuple[str, str]]  # (path, reason) of this batch's unusable files


class Progress:
    """One line on stderr, redrawn at most twice a second on a terminal (serve has no tqdm)."""

    def __init__(self, total: int, what: str = "images"):
        self.total, self.what, self.done = total, what, 0
        self.started = self.shown = time.monotonic()
        self.live = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and (now - self.shown >= 0.5 or self.done == self.total):
            self.shown = now
            print(f"\r{self.line()}", end="", file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        percent = 100 * self.done / max(self.total, 1)
        bar = "#" * int(percent // 5)
        return (f"[{bar:<20}] {self.done}/{self.total} {self.what} {percent:3.0f}% "
                f"{self.done / elapsed:.1f}/s")

    def close(self) -> None:
        print(("\r" if self.live else "") + self.line(), file=sys.stderr, flush=True)


def model_key(predictor: Predictor) -> str:
    """name.precision, and .engine after it for engines other than ONNX Runtime."""
    engine = getattr(predictor, "engine", "onnxruntime")
    return f"{predictor.name}.{predictor.precision}" + ("" if engine == "onnxruntime" else f".{engine}")


def classify_files(paths: Sequence[str], predictors: Sequence[Predictor], batch_size: int,
                   workers: int, max_pixels: int = imaging.SERVING_MAX_PIXELS,
                   progress: Progress | None = None) -> Iterator[Batch]:
    """Every model's probabilities for ``paths``, one batch at a time, in order."""
    specs = list(dict.fromkeys(p.preprocessing for p in predictors))  # distinct, in order
    chunks = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    jobs = ((chunk, specs, max_pixels) for chunk in chunks)
    if workers > 0:
        # spawn: the workers start clean, without this process's ONNX Runtime thread pools.
        pool = multiprocessing.get_context("spawn").Pool(workers)
        # Split each batch across the workers; keep a bounded number of batches in flight.
        pending: deque = deque()

        def submit():
            job = next(jobs, None)
            if job is not None:
                chunk, _, _ = job
                step = max(1, -(-len(chunk) // workers))
                parts = [(chunk[i:i + step], specs, max_pixels) for i in range(0, len(chunk), step)]
                pending.append((chunk, pool.map_async(_input_arrays_of_many, parts)))

        def decoded():
            for _ in range(workers + 1):
                submit()
            while pending:
                chunk, result = pending.popleft()
                submit()
                yield chunk, [d for part in result.get() for d in part]
        source = decoded()
    else:
        pool = None
        source = ((job[0], _input_arrays_of_many(job)) for job in jobs)
    try:
        for chunk, results in source:
            good = [i for i, r in enumerate(results) if not isinstance(r, str)]
            failures = [(chunk[i], r) for i, r in enumerate(results) if isinstance(r, str)]
            probabilities = {}
            if good:
                inputs = {spec: np.stack([results[i][k] for i in good]).transpose(0, 3, 1, 2)
                          for k, spec in enumerate(specs)}
                for predictor in predictors:
                    batch = predictor.preprocessing.normalize(inputs[predictor.preprocessing])
                    probabilities[model_key(predictor)] = predictor.probabilities(batch)
            if progress:
                progress.update(len(chunk))
            yield Batch([chunk[i] for i in good], probabilities, failures)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

"""Shared by the benchmark scripts: the machine's description, interleaved timing, tables, JSON.

Every figure a benchmark prints is a ratio of two things timed in the same process, in
alternating blocks, so that load from other processes falls on both sides alike.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import common.cpu
from common import files
from common.cpu import usable_logical_cpus

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set extensions that decide INT8 and BF16 speed on x86."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return [f for f in wanted if f in common.cpu.cpu_flags()]


def machine() -> dict:
    """What the figures were measured on, including how busy the machine was."""
    import numpy
    import onnxruntime

    info = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "cores": usable_logical_cpus(),
        "python": platform.python_version(), "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for package in ("torch", "openvino"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            pass
    return info


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, per_block: int,
                warmup: int = 2, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed in alternating blocks of ``per_block`` calls.

    Round r runs every contender's block once, starting with a different contender each round,
    so a burst of outside load or a warm-up effect cannot favour one side. ``clock`` may be
    time.thread_time for single-threaded work on a busy machine: CPU time is not stretched by
    other processes taking turns on the cores.
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = contenders[name]
            for _ in range(per_block):
                started = clock()
                fn()
                times[name].append(clock() - started)
    return times


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> Path:
    """The results file (its folder made first), written atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, payload)
    return path


def command_line(argv: list[str] | None, module: str) -> str:
    import sys

    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *args])


def model_names(text: str) -> list[str] | None:
    """A --models value as a list of registry names, or None after printing what is wrong."""
    from training.models import MODEL_NAMES

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names or any(n not in MODEL_NAMES for n in names):
        print(f"error: --models must name some of {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return None
    return names

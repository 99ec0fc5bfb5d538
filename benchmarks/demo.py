"""``python -m benchmarks.demo``: wall time of the README's main job on the built-in dataset.

Runs, as a first-time user would, in a fresh folder (so runs/, models/ and data/ of this checkout
are left alone): ``python -m training.run`` (which generates the built-in dataset first),
``python -m export.run`` and ``python -m serve.app``, the last until it answers HTTP on its
port. Prints each stage's time and the total, and writes benchmarks/results/demo.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, command_line, machine, markdown_table, write_json
from serve.launch import free_port, stop, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 300


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", action="store_true", help="also export INT8 (export.run --quantize int8)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--app-timeout", type=float, default=300, help="seconds to wait for the app")
    parser.add_argument("--out", default=str(RESULTS_DIR / "demo.json"), help="JSON results file")
    return parser.parse_args(argv)


def stage(name: str, args: list[str], cwd: Path, env: dict) -> float:
    print(f"-- {name}: python {' '.join(args)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed with exit code {result.returncode}")
    print(f"-- {name}: {seconds:.1f}s", flush=True)
    return seconds


def app_until_answering(cwd: Path, env: dict, timeout: float) -> float:
    port = free_port()
    args = ["-m", "serve.app", "--port", str(port)]
    print(f"-- app: python {' '.join(args)} (until http://127.0.0.1:{port}/ answers)", flush=True)
    started = time.perf_counter()
    app = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", app, timeout)
        seconds = time.perf_counter() - started
        print(f"-- app: answering after {seconds:.1f}s", flush=True)
        return seconds
    finally:
        stop(app)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    info = machine()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    times = {}
    try:
        times["train"] = stage("train", ["-m", "training.run"], work, env)
        export = ["-m", "export.run"] + (["--quantize", "int8"] if args.quantize else [])
        times["export"] = stage("export", export, work, env)
        times["app"] = app_until_answering(work, env, args.app_timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(times.values())
    rows = [[name, f"{seconds:.1f}"] for name, seconds in times.items()]
    rows.append(["total", f"{total:.1f} ({total / 60:.1f} min; target <= {TARGET_SECONDS / 60:.0f} min)"])
    print("\n" + markdown_table(["stage", "seconds"], rows))
    info["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = write_json(Path(args.out), {"command": command_line(argv, "benchmarks.demo"), "machine": info,
                                      "seconds": times, "total_seconds": total,
                                      "target_seconds": TARGET_SECONDS})
    print(f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

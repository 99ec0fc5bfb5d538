"""Start ``python -m serve.app`` in a child process and wait until it answers (tests, benchmarks).

    with running_app("models") as url:
        Client(url).predict(handle_file("cat.jpg"), api_name="/classify")
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class AppUrl(str):
    """The app's URL, carrying its process (``.process``) and its output so far (``.output()``)
    for callers that watch it."""

    process: subprocess.Popen
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    """Ask the app to stop (SIGTERM, as a container stop would); kill it after ``grace`` s."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_app(models: str | os.PathLike, *args: str, port: int | None = None, timeout: float = 180,
                env: dict | None = None):
    """Yield the URL of a fresh app serving ``models`` (an AppUrl) once /readyz answers 200;
    stop it (and show its log if it failed). ``env`` adds to the child's environment."""
    port = port or free_port()
    url = AppUrl(f"http://127.0.0.1:{port}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", **(env or {})}
    with tempfile.NamedTemporaryFile("w+", prefix="serve-app-", suffix=".log") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve.app", "--models", str(models), "--port", str(port), *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            try:
                wait_until_up(url + "/readyz", process, timeout)
            except (RuntimeError, TimeoutError) as exc:
                log.seek(0)
                raise RuntimeError(f"{exc}; its output:\n{log.read()[-3000:]}") from None
            url.process, url.log_path = process, Path(log.name)
            yield url
        finally:
            stop(process)

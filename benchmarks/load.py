"""``python -m benchmarks.load``: many simultaneous API clients against the app, on loopback.

N client threads (``--clients``, at most 64) share a fixed number of ``/classify`` requests
(``--requests``) and stop early at ``--max-seconds``. The app is started here on a free
loopback port (with ``--concurrency``), unless ``--url`` names a loopback one already running.
Prints requests per second, p50/p99 latency and the error count; writes
benchmarks/results/load.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from benchmarks.common import RESULTS_DIR, command_line, machine, markdown_table, write_json  # noqa: E402
from serve.catalog import PRECISIONS, read_manifest  # noqa: E402
from serve.launch import running_app  # noqa: E402

MAX_CLIENTS = 64
MAX_REQUESTS = 10_000
MAX_SECONDS = 900


def bounded(limit: int):
    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be between 1 and {limit}, got {value}")
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models", help="models folder (default: models)")
    parser.add_argument("--url", help="a loopback app to load (default: start one on a free port)")
    parser.add_argument("--clients", type=bounded(MAX_CLIENTS), default=8,
                        help="simultaneous clients (default: 8)")
    parser.add_argument("--requests", type=bounded(MAX_REQUESTS), default=80,
                        help="requests in all (default: 80)")
    parser.add_argument("--max-seconds", type=bounded(MAX_SECONDS), default=300,
                        help="stop sending after this long (default: 300)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="the started app's --concurrency (default: 1)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the started app's --precision (default: fp32)")
    parser.add_argument("--image", help="image to send (default: the first example in the manifest)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "load.json"), help="JSON results file")
    return parser.parse_args(argv)


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def hammer(url: str, image: Path, clients: int, requests: int, max_seconds: float) -> dict:
    """Run the clients; every request's latency, and errors counted by message."""
    tickets = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + max_seconds

    def client_loop():
        try:
            # Loopback http: no TLS to verify, and gradio_client's default would parse the CA
            # bundle three times per request, on the cores the app needs.
            client = Client(url, verbose=False, ssl_verify=False)
        except Exception as exc:  # noqa: BLE001 - counted, not fatal
            with lock:
                errors[f"connect: {str(exc).splitlines()[0][:120]}"] += 1
            return
        while time.monotonic() < deadline:
            with lock:
                if next(tickets, None) is None:
                    return
            started = time.perf_counter()
            try:
                results = client.predict(handle_file(str(image)), api_name="/classify")
                if not results:
                    raise ValueError("empty result")
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - counted, not fatal
                with lock:
                    errors[str(exc).splitlines()[0][:120] or type(exc).__name__] += 1

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients, "requests": requests, "completed": len(latencies),
        "errors": sum(errors.values()), "error_messages": dict(errors), "wall_s": wall,
        "requests_per_s": len(latencies) / wall if wall else 0.0,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.url and not is_loopback(args.url):
        print(f"error: {args.url} is not a loopback address; this tool only loads local apps",
              file=sys.stderr)
        return 1
    image = Path(args.image) if args.image else None
    if image is None:
        examples = read_manifest(Path(args.models)).get("examples", [])
        if not examples:
            print("error: no --image given and no examples in the manifest", file=sys.stderr)
            return 1
        image = Path(args.models) / examples[0]
    if args.url:
        result = hammer(args.url, image, args.clients, args.requests, args.max_seconds)
    else:
        with running_app(args.models, "--precision", args.precision,
                         "--concurrency", str(args.concurrency)) as url:
            result = hammer(url, image, args.clients, args.requests, args.max_seconds)
    print(markdown_table(["clients", "requests", "completed", "errors", "req/s", "p50 (ms)", "p99 (ms)"],
                         [[result["clients"], result["requests"], result["completed"], result["errors"],
                           result["requests_per_s"], result["p50_ms"], result["p99_ms"]]]))
    for message, count in result["error_messages"].items():
        print(f"  {count} x {message}")
    out = write_json(Path(args.out), {"command": command_line(argv, "benchmarks.load"),
                                      "machine": machine(), "url": args.url or "started here",
                                      "concurrency": None if args.url else args.concurrency,
                                      "precision": args.precision, "image": str(image), **result})
    print(f"wrote {out}")
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())

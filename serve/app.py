"""``python -m serve.app``: serve the exported models side by side in a Gradio page and API,
with a plain HTTP API (/api/v1/classify, /api/v1/models, /healthz, /readyz) on the same port.

    python -m serve.app                       # models/ on http://127.0.0.1:7860
    python -m serve.app --models other/ --port 8000 --precision int8

Every model of the chosen precision in DIR/manifest.json is loaded once, at start; a start-up
problem (no folder, no models, a broken or metadata-less .onnx file, class names that differ,
a port in use) ends the program with one line on stderr and exit code 2 (1 if the server fails
once it has started listening).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

# Before Gradio is imported: nothing phones home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import uvicorn  # noqa: E402

import imaging  # noqa: E402
from common.errors import Failure, UserError, run_cli  # noqa: E402
from serve.catalog import add_engine_arguments, load_catalog  # noqa: E402
from serve.service import DEFAULT_DEADLINE_SECONDS  # noqa: E402

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # larger uploads are refused before they reach the decoder
MAX_WAITING = 64  # requests beyond this many waiting in the queue are turned away
QUEUE_POLL_SECONDS = 0.005
SHUTDOWN_GRACE_SECONDS = 5  # open connections (the page's event streams) get this long on stop
DRAIN_SECONDS = 3.0  # after SIGTERM: /readyz says 503 this long before the server stops listening
KEEP_ALIVE_SECONDS = 5  # an idle kept-alive connection is closed after this
UPLOAD_FOLDER_MB = 1024  # Gradio's upload folder is kept under this; the oldest files go first


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.app", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models", help="folder with manifest.json (default: models)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    add_engine_arguments(parser)
    parser.add_argument("--concurrency", type=positive_int, default=1,
                        help="requests classified at the same time; others wait in the queue "
                             "(default: 1, each request already uses every core)")
    parser.add_argument("--queue-size", type=positive_int, default=MAX_WAITING,
                        help="requests that may wait for their turn; more are turned away "
                             f"(default: {MAX_WAITING})")
    parser.add_argument("--max-pixels", type=positive_int, default=imaging.SERVING_MAX_PIXELS,
                        help="refuse larger images before decoding them "
                             f"(default: {imaging.SERVING_MAX_PIXELS:,}: at most about 300 MB per image; "
                             "lower per format, see docs/serving.md)")
    parser.add_argument("--deadline", type=positive_float, default=DEFAULT_DEADLINE_SECONDS,
                        help="seconds a request may take once it is classified: later it gets 503, "
                             f"its slot is freed and /readyz says 503 (default: {DEFAULT_DEADLINE_SECONDS:g})")
    parser.add_argument("--upload-folder-mb", type=positive_int, default=UPLOAD_FOLDER_MB,
                        help="keep Gradio's folder of uploads and page pictures under this many MB, "
                             f"evicting the oldest files (default: {UPLOAD_FOLDER_MB})")
    parser.add_argument("--drain-seconds", type=float, default=DRAIN_SECONDS,
                        help="after SIGTERM, seconds /readyz answers 503 while the server still "
                             f"serves, before it stops listening (default: {DRAIN_SECONDS:g})")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def connection_limit(args: argparse.Namespace) -> int:
    """Connections the server holds at once; more get 503 from uvicorn. Each waiting or running
    request holds one, a page holds one or two more (its event stream, its uploads)."""
    return 2 * (args.concurrency + args.queue_size) + 32


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, checked before the models are loaded."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot resolve host '{host}': {exc.strerror}"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as exc:
            return f"port {port} on {host} is not available ({exc.strerror}); choose another with --port"
    return None


def main(argv=None) -> int:
    return run_cli(lambda: serve(parse_args(argv)))


def build_app(catalog, args: argparse.Namespace):
    """The FastAPI app: the HTTP API's routes, with the Gradio page mounted at /."""
    import gradio as gr

    from serve.gate import Gate
    from serve.guard import UploadFolder
    from serve.http_api import create_app
    from serve.service import Service
    from serve.ui import build_demo, upload_folder

    service = Service(catalog, Gate(args.concurrency, args.queue_size), args.max_pixels, args.deadline)
    demo = build_demo(catalog, service)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    # Gradio's queue looks for work every 1 ms, idle or busy: about 9% of a core for nothing,
    # and the wake-ups slow the models of a running request. A 5 ms look costs a request at
    # most 5 ms of waiting. (A private setting: left alone if Gradio renames it.)
    if hasattr(getattr(demo, "_queue", None), "sleep_when_free"):
        demo._queue.sleep_when_free = QUEUE_POLL_SECONDS
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts fetched
    app = create_app(service, MAX_UPLOAD_BYTES, UploadFolder(upload_folder, args.upload_folder_mb * 1024 * 1024))
    gr.mount_gradio_app(app, demo, path="", server_name=args.host, server_port=args.port,
                        max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, mcp_server=False, pwa=False,
                        theme=theme, run_history=False,  # no history kept
                        footer_links=["api", "settings"])
    app.state.service = service
    return app


def serve(args: argparse.Namespace) -> int:
    problem = port_problem(args.host, args.port)
    if problem:
        raise UserError(problem)
    catalog = load_catalog(args.models, args.precision, engine=args.engine)
    print(f"Loaded {', '.join(p.display_name for p in catalog.predictors)} "
          f"({catalog.precision}) from {catalog.folder}", flush=True)

    app = build_app(catalog, args)
    access = logging.getLogger("serve.access")
    access.setLevel(logging.INFO)
    access.addHandler(logging.StreamHandler(sys.stderr))
    access.propagate = False
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
                            limit_concurrency=connection_limit(args),
                            timeout_keep_alive=KEEP_ALIVE_SECONDS)
    server = DrainingServer(config, app.state.service, args.drain_seconds)
    print(f"Serving on http://{args.host}:{args.port} (the HTTP API under /api/v1/)", flush=True)
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying it could not listen, after logging why
        raise Failure(f"cannot listen on {args.host}:{args.port}") from None
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but SIGTERM (a container or pod stop) first marks the service as
    draining, so /readyz answers 503 while requests are still served, and stops the server
    ``drain_seconds`` later; SIGINT (Ctrl-C) and a second SIGTERM stop it at once."""

    def __init__(self, config: uvicorn.Config, service, drain_seconds: float):
        super().__init__(config)
        self.service = service
        self.drain_seconds = drain_seconds
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):
        draining, self.service.draining = self.service.draining, True
        if sig == signal.SIGTERM and not draining and self.drain_seconds > 0 and self.loop:
            # Runs in a signal handler: hand the delayed stop to the loop the thread-safe way.
            self.loop.call_soon_threadsafe(self.loop.call_later, self.drain_seconds,
                                           super().handle_exit, sig, frame)
            return
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())

"""An ASGI middleware in front of everything: every request body is bounded in bytes and seconds,
and Gradio's routes do only what the page needs.

- Every request body is read here first, within ``body_seconds`` and a byte limit (1 MB for
  Gradio's event calls, the upload limit for uploads and the HTTP API), spooled to disk above
  1 MB, and only then handed on: a slow or cut-off upload never reaches a handler, holds no
  classification slot and leaves no partial file behind.
- POSTs under /gradio_api/ must carry exactly one content type (parsed as HTTP says:
  case-insensitive, parameters stripped). Event calls must be JSON, and every "path" in them
  must name a file in the upload folder: Gradio downloads a URL it finds there, and would copy
  any server file into its cache. /gradio_api/upload must be multipart with one file.
- /gradio_api/file= and /gradio_api/file/ serve only files in the upload folder (uploads,
  the examples Gradio copied there, the page's pictures): Gradio would fetch a URL for anyone.
  /gradio_api/proxy= is closed.
- The upload folder is kept under ``max_bytes`` and MAX_FOLDER_FILES, oldest files evicted first (the
  examples copied there at start are kept).
"""
from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from python_multipart.exceptions import MultipartParseError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

log = logging.getLogger("serve")
GRADIO = "/gradio_api/"
MAX_EVENT_BYTES = 1 << 20  # Gradio's event calls carry paths and settings, never file contents
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
SPOOL_BYTES = 1 << 20  # a body above this waits on disk, not in memory
CHUNK = 64 * 1024
MAX_FOLDER_FILES = 5000  # the upload folder's files at most (each trim walks them all)
DEFAULT_BODY_SECONDS = 60.0  # a whole body must arrive within this (50 MB at 0.9 MB/s)


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def named_paths(value) -> list[str]:
    """Every string under a "path" key, at any depth."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("path"), str):
                found.append(item["path"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def content_type(headers: Headers) -> tuple[str, dict[bytes, bytes]]:
    """The one media type of a request (lower case, no parameters) and its parameters."""
    values = headers.getlist("content-type")
    if len(values) != 1:
        raise Refused(400 if values else 415, "send exactly one Content-Type header"
                      if values else "a Content-Type header is required")
    kind, options = parse_options_header(values[0])
    return kind.decode("latin-1"), options


def foreign(path: str, folder: Path | None) -> str | None:
    """Why ``path`` (named in a request) is not a file in ``folder``, or None if it is one."""
    if "://" in path or path.startswith("data:"):
        return "only uploaded files are accepted, not URLs"
    try:
        inside = folder is not None and Path(path).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        inside = False
    return None if inside else "only uploaded files are accepted, not paths on the server"


class Body:
    """A request body, read whole within a time and byte limit, replayed to the app."""

    def __init__(self, limit: int):
        self.file = tempfile.SpooledTemporaryFile(SPOOL_BYTES)
        self.limit = limit
        self.size = 0

    async def read(self, receive, seconds: float, on_chunk: Callable[[bytes], None] | None = None) -> bool:
        """False when the client went away before sending it all."""
        try:
            with anyio.fail_after(seconds):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return False
                    chunk = message.get("body", b"")
                    self.size += len(chunk)
                    if self.size > self.limit:
                        raise Refused(413, f"request body above the limit of {self.limit:,} bytes")
                    if on_chunk is not None:
                        on_chunk(chunk)
                    self.file.write(chunk)
                    if not message.get("more_body", False):
                        self.file.seek(0)
                        return True
        except TimeoutError:
            raise Refused(408, f"the request body did not arrive within {seconds:g} s") from None

    def replay(self, receive):
        done = False

        async def replayed():
            nonlocal done
            if done:
                return await receive()  # after the body: the client's disconnect, if any
            chunk = self.file.read(CHUNK)
            done = self.file.tell() >= self.size
            return {"type": "http.request", "body": chunk, "more_body": not done}
        return replayed

    def close(self) -> None:
        self.file.close()


class OneFileUpload:
    """Counts the parts of a multipart body as it streams in; a second part is refused."""

    def __init__(self, boundary: bytes):
        self.parts = 0
        self.parser = MultipartParser(boundary, callbacks={"on_part_begin": self.begin})

    def begin(self) -> None:
        self.parts += 1
        if self.parts > 1:
            raise Refused(400, "upload one file per request")

    def __call__(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise Refused(400, f"malformed multipart body: {exc}") from None


class UploadFolder:
    """Gradio's upload folder, kept under a total size by evicting the oldest files."""

    def __init__(self, folder: Callable[[], Path], max_bytes: int):
        self._folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.kept = set(self.files())  # what was there at start: the examples' copies

    @property
    def path(self) -> Path:
        return self._folder()

    def files(self) -> list[Path]:
        root = self.path
        return [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []

    def trim(self) -> int:
        """Delete the oldest files until the folder is under its cap; the bytes freed."""
        with self._lock:
            entries = []
            for path in self.files():
                try:
                    stat = path.stat()
                except OSError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in entries)
            freed, left = 0, len(entries)
            for _, size, path in sorted(entries, key=lambda e: e[0]):
                # Bytes and count: many tiny files would make every later walk of the folder slow.
                if total - freed <= self.max_bytes and left <= MAX_FOLDER_FILES:
                    break
                if path in self.kept:
                    continue
                try:
                    path.unlink()
                    freed, left = freed + size, left - 1
                except OSError:
                    pass
            if freed:
                log.warning("upload folder above %s bytes: evicted %s bytes of the oldest files",
                            f"{self.max_bytes:,}", f"{freed:,}")
            return freed


class Guard:
    def __init__(self, app, upload_folder: UploadFolder | None, max_upload_bytes: int,
                 body_seconds: float = DEFAULT_BODY_SECONDS):
        self.app = app
        self.uploads = upload_folder
        self.max_upload_bytes = max_upload_bytes
        self.body_seconds = body_seconds

    @property
    def folder(self) -> Path | None:
        return self.uploads.path if self.uploads is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        try:
            if path.startswith(GRADIO + "file=") or path.startswith(GRADIO + "file/"):
                self.check_file(path)
            elif path.startswith(GRADIO + "proxy="):
                raise Refused(404, "not found")
            if method in ("GET", "HEAD", "OPTIONS"):
                return await self.app(scope, receive, send)
            await self.with_body(scope, receive, send)
        except Refused as exc:
            await JSONResponse({"error": str(exc)}, exc.status)(scope, receive, send)

    def check_file(self, path: str) -> None:
        prefix_end = len(GRADIO) + len("file=")
        target = unquote(path[prefix_end:])
        if foreign(target, self.folder):
            raise Refused(404, "not found: only files this server wrote are served")

    async def with_body(self, scope, receive, send) -> None:
        path = scope["path"]
        headers = Headers(scope=scope)
        upload = path.rstrip("/") == GRADIO + "upload"
        on_chunk = None
        if path.startswith(GRADIO):
            kind, options = content_type(headers)
            if upload:
                if kind != "multipart/form-data" or b"boundary" not in options:
                    raise Refused(415, "uploads are multipart/form-data")
                on_chunk = OneFileUpload(options[b"boundary"])
            elif kind != "application/json":
                raise Refused(415, "Gradio's API takes JSON")
        limit = MAX_EVENT_BYTES if path.startswith(GRADIO) and not upload else \
            self.max_upload_bytes + MULTIPART_OVERHEAD
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise Refused(413 if length.isdigit() else 400,
                          f"request body above the limit of {limit:,} bytes" if length.isdigit()
                          else "malformed Content-Length")
        body = Body(limit)
        try:
            if not await body.read(receive, self.body_seconds, on_chunk):
                return  # the client went away: nothing reaches the app, nothing is kept
            if path.startswith(GRADIO) and not upload:
                self.check_event(body)
            await self.app(scope, body.replay(receive), send)
        finally:
            body.close()
        if upload and self.uploads is not None:
            await anyio.to_thread.run_sync(self.uploads.trim)

    def check_event(self, body: Body) -> None:
        raw = body.file.read()
        body.file.seek(0)
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            raise Refused(400, "the request body is not valid JSON") from None
        for named in named_paths(payload):
            problem = foreign(named, self.folder)
            if problem:
                raise Refused(400, f"Cannot classify this file: {problem}.")

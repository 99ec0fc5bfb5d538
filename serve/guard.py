"""An ASGI middleware in front of Gradio: event payloads may name uploaded files only.

Gradio copies every file named in an event's payload into its cache before the event's
function runs, and for a payload whose "path" is a URL it downloads that URL first: a client
could make the server fetch anything it can reach. This middleware reads the JSON body of
each POST to Gradio's API (small: files travel through /gradio_api/upload, which is multipart
and not inspected here) and refuses the request when any "path" in it is a URL or a file
outside the upload cache, before Gradio sees it.
"""
from __future__ import annotations

import json

from starlette.responses import JSONResponse

from serve.ui import foreign_file

MAX_JSON_BYTES = 1 << 20  # event payloads carry paths and settings, never file contents


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


class UploadsOnly:
    def __init__(self, app, prefix: str = "/gradio_api/"):
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or \
                not scope["path"].startswith(self.prefix) or \
                b"json" not in dict(scope.get("headers", [])).get(b"content-type", b""):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_JSON_BYTES:
                return await JSONResponse({"error": "request body too large"}, 413)(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            paths = named_paths(json.loads(body)) if body else []
        except ValueError:
            paths = []  # not JSON after all: Gradio answers it
        for path in paths:
            problem = foreign_file(path)
            if problem:
                return await JSONResponse({"error": f"Cannot classify this file: {problem}."}, 400)(
                    scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

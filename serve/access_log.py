"""Request IDs and one structured access-log line per request (an ASGI middleware).

Each response carries ``X-Request-ID``: the client's own, when it sent a well-formed one (so a
request can be followed through a proxy), else a new one. When the response ends, the logger
``serve.access`` gets one JSON line: method, path (no query string), status, response bytes,
milliseconds and the request id; never a header value or any of the body.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders

log = logging.getLogger("serve.access")
REQUEST_ID = "x-request-id"
WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # nothing that could forge a log line


def request_id(headers: Headers) -> str:
    sent = headers.get(REQUEST_ID, "")
    return sent if WELL_FORMED.fullmatch(sent) else uuid.uuid4().hex


class AccessLog:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(Headers(scope=scope))
        started = time.perf_counter()
        status, sent = 0, 0

        async def send_with_id(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID] = rid
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(json.dumps({
                "method": scope["method"], "path": scope["path"][:512], "status": status,  # 0: the app sent no response
                "bytes": sent, "ms": round((time.perf_counter() - started) * 1000, 1),
                "request_id": rid}))

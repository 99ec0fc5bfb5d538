"""One concurrency limit for every door: the page's /classify and the HTTP API.

Both run their classification inside ``Gate.slot()`` on the server's event loop, so at most
``limit`` images are decoded and classified at once whichever door they came through (each
one already uses every core). The page's requests wait in Gradio's queue first (it shows
their place in line); the HTTP API's wait here, and beyond ``max_waiting`` of them a request
is turned away at once (503 with Retry-After) instead of piling up.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class Gate:
    def __init__(self, limit: int, max_waiting: int):
        self.limit = limit
        self.max_waiting = max_waiting
        self.waiting = 0
        self.running = 0
        self.seconds_per_request = 0.5  # a running estimate, for Retry-After
        self._semaphore: asyncio.Semaphore | None = None  # made on the server's loop

    def full(self) -> bool:
        return self.running >= self.limit and self.waiting >= self.max_waiting

    def retry_after(self) -> int:
        """Seconds until the line ahead is likely through, at least 1."""
        ahead = self.waiting + self.running
        return max(1, math.ceil(ahead * self.seconds_per_request / self.limit))

    @contextlib.asynccontextmanager
    async def slot(self, turn_away_when_full: bool = False):
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        if turn_away_when_full and self.full():
            raise QueueFull(self.retry_after())
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.running -= 1
            self._semaphore.release()
            self.seconds_per_request += 0.2 * (time.monotonic() - started - self.seconds_per_request)

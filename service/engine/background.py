"""The engine's background loops: how often they run, and the loop that runs one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("service.engine.session_engine")

# A background sweep's slice: it runs this long on the event loop, then leaves the loop to
# requests for as long again (so it takes at most half of a busy loop). A sweep that
# checkpointed every idle session in one go stalled the loop: one session's feeds beside ~600
# creations/s read p99 332-404 ms, max ~2 s; in these slices 108-126 / 160-176 ms
# (`python -m benchmarks.churn`; the README's "Background sweeps").
SLICE_SECONDS = 0.002


@dataclass(frozen=True)
class Background:
    """How often the engine's background loops run (0: never)."""

    sweep_seconds: float
    poll_seconds: float
    write_timeout: float = 30.0  # shutdown: the most time writing sessions may take


async def every(seconds: float, work: Callable[[], Awaitable[Any]]) -> None:
    """Run `work` every `seconds` until cancelled; a failure is logged and the loop goes on
    (one bad session must not stop expiry, nor a store caught mid-edit the poller)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except Exception:
            log.exception("background %s failed", getattr(work, "__name__", "task"))


class Slices:
    """Long work on the event loop, cut into slices: `await slices.breathe()` between items
    pauses for `seconds` once `seconds` of work have run since the last pause, so requests are
    served meanwhile. An item must be re-checked after a breath: a request may have used, moved
    or ended it."""

    def __init__(self, seconds: float = SLICE_SECONDS) -> None:
        self._seconds = seconds
        self._since = time.perf_counter()
        self.breaths = 0  # how many times it yielded

    async def breathe(self) -> None:
        if time.perf_counter() - self._since >= self._seconds:
            await asyncio.sleep(self._seconds)
            self.breaths += 1
            self._since = time.perf_counter()

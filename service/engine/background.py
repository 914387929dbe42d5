"""The engine's background loops: how often they run, and the loop that runs one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("service.engine.session_engine")


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

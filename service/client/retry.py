"""Retrying what the server could not take: the same request again (same request id, same
expected position), so it applies once."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying a request the server could not take (see `retryable`)."""

    deadline_seconds: float = 30.0  # give up (re-raise) after this long
    first_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 1.0

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.deadline_seconds
        backoff = self.first_backoff_seconds
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as err:
                if not retryable(err) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff_seconds)


def retryable(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE (restarting, draining, the state tier or disk refusing writes, the session
    moving between replicas), and CANCELLED when this client did not cancel (a call caught by a
    server's shutdown arrives so; a call this client cancels raises asyncio.CancelledError
    instead). Both are safe to resend: the request id and expected position make it apply once."""
    return err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def new_request_id() -> str:
    return uuid.uuid4().hex

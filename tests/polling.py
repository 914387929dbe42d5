"""Waiting in tests for something to happen: poll a condition until it holds, or fail saying
what never happened and for how long it was waited for.

`until` (in a coroutine) and `until_sync` (in a thread) call `condition()` at once and then
after each `interval`, and return its first truthy value. They give up only once `seconds` have
passed AND they have slept `seconds / interval` times, so a bound written as "N tries, x s
apart" is kept even where a loaded host's stalls make the sleeps run long; then they raise
AssertionError naming `what` (and `detail()`, if given, for the state at the time)."""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


def _rounds(seconds: float, interval: float) -> int:
    """The sleeps a bound of `seconds` at `interval` is worth (60 s at 0.01 s: 6000)."""
    if seconds < 0 or interval <= 0:
        raise ValueError(f"a bound of {seconds} s polled every {interval} s")
    return max(1, math.ceil(seconds / interval - 1e-9))


def _timed_out(
    what: str, seconds: float, interval: float, slept: int, began: float, detail: Any
) -> AssertionError:
    message = (
        f"timed out waiting for {what}: still not so after {time.monotonic() - began:.2f} s "
        f"({slept} sleeps of {interval:g} s; the bound was {seconds:g} s)"
    )
    if detail is not None:
        message += f"\n{detail()}"
    return AssertionError(message)


@overload
async def until(
    condition: Callable[[], Awaitable[T]],
    seconds: float,
    what: str,
    interval: float = ...,
    detail: Callable[[], object] | None = ...,
) -> T: ...


@overload
async def until(
    condition: Callable[[], T],
    seconds: float,
    what: str,
    interval: float = ...,
    detail: Callable[[], object] | None = ...,
) -> T: ...


async def until(
    condition: Callable[[], Any],
    seconds: float,
    what: str,
    interval: float = 0.01,
    detail: Callable[[], object] | None = None,
) -> Any:
    """`condition()`'s first truthy value, awaited if it returns an awaitable (a coroutine
    function may be passed); `asyncio.sleep(interval)` between tries."""
    rounds, began, slept = _rounds(seconds, interval), time.monotonic(), 0
    while True:
        got = condition()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if slept >= rounds and time.monotonic() - began >= seconds:
            raise _timed_out(what, seconds, interval, slept, began, detail)
        await asyncio.sleep(interval)
        slept += 1


def until_sync(
    condition: Callable[[], T],
    seconds: float,
    what: str,
    interval: float = 0.01,
    detail: Callable[[], object] | None = None,
) -> T:
    """`until` for code off the event loop: `time.sleep(interval)` between tries."""
    rounds, began, slept = _rounds(seconds, interval), time.monotonic(), 0
    while True:
        got = condition()
        if got:
            return got
        if slept >= rounds and time.monotonic() - began >= seconds:
            raise _timed_out(what, seconds, interval, slept, began, detail)
        time.sleep(interval)
        slept += 1

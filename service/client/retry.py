"""The client's one retry layer, and its timeouts.

A call the server could not take (UNAVAILABLE: restarting, draining, its disk refusing writes,
the session moving between replicas) is sent again, the same request (same request id, same
expected position) so it applies once: only calls that are safe to repeat are retried (steps
with `expected_position` + `request_id`, creates and forks with a `request_id`, reads). The
channel itself retries nothing (`CHANNEL_OPTIONS`): no gRPC service-config retry policy
stacks under this one.

A timeout bounds a whole call, retries and backoff included: each attempt gets what is left as
its gRPC deadline. Every failure leaves as a `service.client.errors.SeqServeError`.

A client's backoff pauses are its `Pauses`: closing the client ends them, so that a call
waiting to retry ends as one in flight does (`asyncio.CancelledError`), not with a retry on
the closed channel.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from service.client.errors import (
    DeadlineExceededError,
    SeqServeError,
    SessionBusyError,
    error_from_rpc,
)

CLIENT_CLOSED = "the client is closed"  # a call after `close()`: its UsageError's message

T = TypeVar("T")

# For every channel the client opens: gRPC's own retries off (transparent ones included), and
# no service config taken from name resolution (where a retry policy could come from).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.enable_retries", 0),
    ("grpc.service_config_disable_resolution", 1),
)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying a request the server could not take (see `retryable`)."""

    deadline_seconds: float = 30.0  # give up (raise the last error) after this long
    first_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 1.0

    def attempts(
        self,
        *,
        timeout: float | None = None,
        retry: bool = True,
        busy: bool = False,
        pauses: Pauses | None = None,
    ) -> Attempts:
        """The attempts of one call. A call made after its client closed is refused here, as
        a multiplexed feed is (the same `UsageError`), not by gRPC's closed channel."""
        if pauses is not None and pauses.closed:
            raise grpc.aio.UsageError(CLIENT_CLOSED)
        return Attempts(self, timeout, retry, busy, pauses)

    async def run(
        self,
        attempt: Callable[[float | None], Awaitable[T]],
        *,
        timeout: float | None = None,
        retry: bool = True,
        busy: bool = False,
        pauses: Pauses | None = None,
    ) -> T:
        """`attempt(seconds_left)` until it succeeds, or fails in a way not to retry (then its
        error, as a `SeqServeError`, is raised). `seconds_left`: None without a timeout.
        `busy`: also try again while the session is busy (SESSION_BUSY: nothing was applied),
        for a request that should wait for the one running, such as a close. `pauses`: the
        client's, which its close ends (else plain sleeps)."""
        attempts = self.attempts(timeout=timeout, retry=retry, busy=busy, pauses=pauses)
        while True:
            try:
                return await attempt(attempts.seconds_left())
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                await attempts.failed(exc)


# Left of a call's timeout below which no last attempt is made (DeadlineExceededError).
_LAST_ATTEMPT_SECONDS = 0.05
# gRPC keeps a deadline as int64 nanoseconds: one past ~9.2e9 s from now overflows, and the
# call fails at once with DEADLINE_EXCEEDED. An attempt with more than this left gets none.
_GRPC_DEADLINE_SECONDS = 1e9


def check_timeout(timeout: object) -> float | None:
    """A `timeout` argument: None or a number of seconds (`math.inf`: no limit, as None).
    TypeError or ValueError for anything else (a string, a bool; NaN, which would silently be
    no limit)."""
    if timeout is None:
        return None
    wrong = TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if isinstance(timeout, bool | str | bytes):
        raise wrong
    try:
        seconds = float(timeout)  # type: ignore[arg-type]  # an int, NumPy's numbers, ...
    except (TypeError, ValueError):
        raise wrong from None
    if math.isnan(seconds):
        raise ValueError("timeout must be a number of seconds or None, not NaN")
    return None if seconds == math.inf else seconds


class Attempts:
    """The attempts of one call: how long the next may take, and whether to make one."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        retry: bool,
        busy: bool = False,
        pauses: Pauses | None = None,
    ) -> None:
        self._policy = policy
        self._pauses = pauses
        now = time.monotonic()
        self._retry_until = now + policy.deadline_seconds
        self._give_up = None if timeout is None else now + timeout
        self._timeout = timeout
        self._retry = retry
        self._busy = busy
        self._backoff = policy.first_backoff_seconds

    def seconds_left(self) -> float | None:
        if self._give_up is None:
            return None
        left = self._give_up - time.monotonic()
        if left <= 0:
            raise self._timed_out()
        return left if left < _GRPC_DEADLINE_SECONDS else None

    async def failed(self, exc: BaseException) -> None:
        """After a failed attempt: return (having slept) to try again, or raise `exc` as a
        `SeqServeError`."""
        if isinstance(exc, TimeoutError):  # an attempt bounded by asyncio, not gRPC
            raise self._timed_out() from None
        if not isinstance(exc, grpc.aio.AioRpcError):
            raise exc
        error = error_from_rpc(exc)
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._give_up is not None:
            raise self._timed_out() from None
        pause = max(self._backoff * (0.5 + random.random()), error.retry_delay or 0.0)
        now = time.monotonic()
        late = now + pause > (self._give_up if self._give_up is not None else float("inf"))
        again = (self._retry and retryable(error)) or (
            self._busy and isinstance(error, SessionBusyError)
        )
        if not again or now > self._retry_until:
            raise error from (None if error is exc else exc)
        if late:  # the timeout, not the policy, ends the retries: it says so
            assert self._give_up is not None
            left = self._give_up - now
            if left < _LAST_ATTEMPT_SECONDS or (error.retry_delay or 0.0) > left:
                raise self._timed_out() from error  # (the server asked for more than is left)
            pause = left / 2  # then another attempt with the other half
        if self._pauses is None:
            await asyncio.sleep(pause)
        else:
            await self._pauses.sleep(pause)
        self._backoff = min(self._backoff * 2, self._policy.max_backoff_seconds)

    def _timed_out(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within the timeout of {self._timeout}s"
        )


class Pauses:
    """The backoff pauses of one client's calls. Its `close` ends them: a call waiting to retry
    raises `asyncio.CancelledError` at once, as a call in flight does when its channel closes
    (and a multiplexed feed when the client cancels it), instead of waking to retry on the
    closed channel (gRPC's `UsageError`)."""

    def __init__(self) -> None:
        self._waiting: set[asyncio.Future[None]] = set()
        self.closed = False

    async def sleep(self, seconds: float) -> None:
        if self.closed:  # the call failed while the client closed: no retry either
            raise asyncio.CancelledError()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, done)
        self._waiting.add(done)
        try:
            await done
        finally:
            timer.cancel()
            self._waiting.discard(done)
        if self.closed:  # its time was up, but the client closed before the call went on
            raise asyncio.CancelledError()

    def close(self) -> None:
        self.closed = True
        for done in self._waiting:
            done.cancel()


def _wake(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def retryable(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE (restarting, draining, the state tier or disk refusing writes, the session
    moving between replicas), and CANCELLED when this client did not cancel (a call caught by a
    server's shutdown arrives so; a call this client cancels raises asyncio.CancelledError
    instead). Both are safe to resend when the request id and expected position make it apply
    once; the caller says whether they do."""
    return err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def new_request_id() -> str:
    return uuid.uuid4().hex


__all__ = [
    "CHANNEL_OPTIONS",
    "Attempts",
    "Pauses",
    "RetryPolicy",
    "SeqServeError",
    "new_request_id",
]

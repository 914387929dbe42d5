"""What the step scheduler exchanges with its callers: a row's owner (told what the step did to
its session), a group of rows submitted together (one future for all), and the journal commit
a version's steps go through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from service.runtime.step_batch import Row, RowResult


class RowOwner(Protocol):
    def record(self, row: Row, result: RowResult) -> bytes:
        """The row's journal record for this step (called before `advance`)."""
        ...

    def advance(self, consumed: int, segment: int | None = None) -> int:
        """`consumed` inputs went into the row's state (journaled in `segment`, if any);
        return the position that leaves."""
        ...


Commit = Callable[[list[bytes]], int]  # one step's journal records → the segment they went to


class RowGroup:
    """Rows submitted together (one feed, or one Stream message's feeds): `future` resolves to
    their outcomes in submission order once every row has run — a RowResult, or the exception
    that failed that row. One future per group, not per row, keeps the per-feed cost of a
    many-session frame low."""

    __slots__ = ("future", "outcomes", "remaining", "taken")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[list[RowResult | BaseException]] = loop.create_future()
        self.outcomes: list[RowResult | BaseException] = [_UNSET] * size  # type: ignore[list-item]
        self.remaining = size
        self.taken = False  # a row of it went into a step

    def withdraw(self) -> bool:
        """Take the group back if none of its rows has gone into a step yet (its caller was
        cancelled): nothing of it will run. False when too late."""
        if self.taken or self.future.done():
            return False
        self.future.cancel()
        return True

    def settle(self, index: int, outcome: RowResult | BaseException) -> None:
        self.outcomes[index] = outcome
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.outcomes)


_UNSET = object()

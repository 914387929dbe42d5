"""What a multiplexed Stream has in hand: the items it has read and not yet answered, by
session (what orders a session's items: `StreamMux`) and in all, and the waits that bound it (the
stream reads no further, a generation's tokens wait for room among the replies)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Unfinished:
    """A stream's items dispatched and not yet replied: by session (what orders a session's
    items), and in all (what, with the replies waiting for the writer, bounds what the stream
    reads). A generation counts until its first token: waiting (behind its session's earlier
    items, say) it holds memory and sends nothing; running, it may run for long and must not
    keep the stream from reading other sessions' items, and its tokens wait for room among the
    replies instead (`room`)."""

    __slots__ = ("_by_session", "_waiters", "total")

    def __init__(self) -> None:
        # Per session with items unfinished: [items dispatched, items replied] (the entry goes
        # when they are equal, so an item's turn counts from the first of a run of them).
        self._by_session: dict[str, list[int]] = {}
        self.total = 0  # feeds unfinished
        self._waiters: list[asyncio.Future[None]] = []  # the reader, generations' consumers

    def of(self, session_id: str) -> int:
        counts = self._by_session.get(session_id)
        return counts[0] - counts[1] if counts is not None else 0

    def add(self, session_id: str) -> int:
        """Count an item of `session_id` in; returns its turn (see `turn`)."""
        counts = self._by_session.get(session_id)
        if counts is None:
            self._by_session[session_id] = counts = [0, 0]
        counts[0] += 1
        self.total += 1
        return counts[0] - 1

    async def turn(self, session_id: str, turn: int) -> None:
        """Until every item of `session_id` before the one whose turn is `turn` has replied:
        a session's replies leave in the order of its items. (An item in a group of its own
        can be ready first: the first of a new session's items, say, lets its lease go when
        its step is done, before its group's replies are posted.)"""
        while True:
            counts = self._by_session.get(session_id)
            if counts is None or counts[1] >= turn:
                return
            await self._wait()

    def started(self) -> None:
        """A generation sent its first token: it no longer counts (see the class)."""
        self.total -= 1
        self.wake()

    def done(self, session_id: str, *, counted: bool = True) -> None:
        """An item of `session_id` replied (its last reply is posted)."""
        counts = self._by_session.get(session_id)
        if counts is not None:
            counts[1] += 1
            if counts[1] >= counts[0]:
                del self._by_session[session_id]
        self.total -= counted
        self.wake()

    def wake(self) -> None:
        """Let every waiter look again (an item finished, the writer took replies)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def below(self, bound: int, waiting: Callable[[], int]) -> None:
        """Until fewer than `bound` items are unfinished, and fewer than twice that many
        replies are `waiting` for the writer: running generations fill the replies only up to
        `bound` (`room`), so they alone never keep the stream from reading; the feeds' replies
        of a client that does not read them do."""
        while self.total >= bound or waiting() >= 2 * bound:
            await self._wait()

    async def room(self, bound: int, waiting: Callable[[], int]) -> None:
        """Until fewer than `bound` replies are `waiting` for the writer."""
        while waiting() >= bound:
            await self._wait()

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

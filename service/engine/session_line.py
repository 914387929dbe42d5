"""A line: one caller's ordered requests (a Stream's items), and each request's place in it.

The session lease (`session_lease`) queues a line's requests for a session in the order they
take their leases; a line also orders requests that must await something first (a quota charge,
a takeover, with a shared state tier) so that they still take their leases in arrival order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class Line:
    """One caller's ordered requests (a Stream): they queue for a session instead of being
    refused, and run in the order they were taken.

    A request that must await something before it takes its leases (with a shared state tier:
    a quota charge, a takeover) would take them in the order those awaits end, not in arrival
    order. So it enters the line first (`enter`: synchronous, in arrival order), and takes its
    leases when `Entry.turn` returns, once the requests that entered before it on any of its
    sessions have taken theirs or given up."""

    __slots__ = ("_entered",)

    def __init__(self) -> None:
        self._entered: dict[str, asyncio.Future[None]] = {}  # the last entry's, by session

    def enter(self, session_ids: Iterable[str]) -> Entry:
        """A place in the line for a request on `session_ids`, after those entered before."""
        passed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        earlier: list[asyncio.Future[None]] = []
        sessions = list(dict.fromkeys(session_ids))
        for session_id in sessions:
            last = self._entered.get(session_id)
            if last is not None and not last.done():
                earlier.append(last)
            self._entered[session_id] = passed
        return Entry(self, sessions, earlier, passed)

    def _forget(self, sessions: list[str], passed: asyncio.Future[None]) -> None:
        for session_id in sessions:
            if self._entered.get(session_id) is passed:
                del self._entered[session_id]


class Entry:
    """A request's place in a `Line` (see there)."""

    __slots__ = ("_earlier", "_left", "_line", "_passed", "_sessions")

    def __init__(
        self,
        line: Line,
        sessions: list[str],
        earlier: list[asyncio.Future[None]],
        passed: asyncio.Future[None],
    ) -> None:
        self._line = line
        self._sessions = sessions
        self._earlier = earlier  # the entries before it, on its sessions, not yet passed
        self._passed = passed  # resolved once it and every entry before it have passed
        self._left = False

    async def turn(self) -> None:
        """Wait until the requests that entered before have taken their leases (or given up),
        and let the later ones go: the caller takes its leases before it next suspends (the
        later ones resume only then)."""
        for earlier in self._earlier:
            if not earlier.done():
                await asyncio.shield(earlier)  # cancelled here, it leaves the others be
        self.leave()

    def leave(self) -> None:
        """Give up the place (refused, cancelled) or pass it (`turn`). Idempotent. The entries
        after go on only once those before have passed too, so they keep their order."""
        if self._left:
            return
        self._left = True
        waiting = [f for f in self._earlier if not f.done()]
        if not waiting:
            self._pass()
            return
        left = len(waiting)

        def one_passed(_done: asyncio.Future[None]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                self._pass()

        for earlier in waiting:
            earlier.add_done_callback(one_passed)

    def _pass(self) -> None:
        self._passed.set_result(None)
        self._line._forget(self._sessions, self._passed)

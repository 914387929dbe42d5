"""Ending the open calls of a revoked token that are waiting.

A lasting call checks its grant (`call_auth.Grant`) before each message it applies and each
reply it sends, so a call that neither receives nor sends (a Stream whose client is idle, a
generation waiting its turn behind another call of its session) would stay open on a revoked
token until its client spoke again. The watch looks at the open calls' grants once a second
while there are any (no task at all when there are none), and ends each one the tokens file
no longer admits through the call's own `end` (the interceptor's: UNAUTHENTICATED, the status
the call would have had from its own next check). The client has its status at once; the
handler finds the call aborted at its next read or reply (a Stream applies no message after
it; a waiting generation may still take its step before its reply fails) and is counted with
that status.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from service.security.tokens import TokenFile

if TYPE_CHECKING:
    from service.security.call_auth import Grant

log = logging.getLogger(__name__)

WATCH_EVERY_S = 1.0  # as the tokens file is looked at: a revoked call ends within ~2 s
_SLICE = 64  # open calls re-checked between two turns of the event loop


class RevocationWatch:
    def __init__(self, tokens: TokenFile, every_s: float | None = None) -> None:
        self._tokens = tokens
        self._every_s = WATCH_EVERY_S if every_s is None else every_s
        self._open: dict[Grant, Callable[[], Awaitable[bool]]] = {}
        self._task: asyncio.Task[None] | None = None
        # Each ending runs on its own: an abort waits until the status is sent, which a client
        # that reads nothing (its window full) holds up; the watch must go on meanwhile.
        self._ending: set[asyncio.Task[None]] = set()
        self.ended = 0  # calls this watch ended

    def __len__(self) -> int:
        return len(self._open)

    def watch(self, grant: Grant, end: Callable[[], Awaitable[bool]]) -> None:
        """Look at `grant` until `unwatch`; `end()` ends its call if it is revoked first
        (False: it had ended already)."""
        self._open[grant] = end
        if self._task is None:  # in a context of its own, not the first call's (its grant)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="seqserve-revocation-watch", context=contextvars.Context()
            )

    def unwatch(self, grant: Grant) -> None:
        self._open.pop(grant, None)

    async def close(self) -> None:
        """Stop watching (the server stopped: its calls are over)."""
        self._open.clear()
        tasks = [t for t in (self._task, *self._ending) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None  # (one cancelled before it ran never reached its `finally`)

    async def _run(self) -> None:
        try:
            while self._open:
                await asyncio.sleep(self._every_s)
                try:
                    await self._look()
                except Exception:  # one bad pass (a file it cannot read): the next may do
                    log.exception("revocation watch: a pass failed; trying again")
        finally:
            self._task = None  # (no await between the loop's test and here: `watch` starts anew)

    async def _look(self) -> None:
        """One pass: each open call whose grant is stale is authenticated again, a few at a
        time (a change re-checks every open call: the loop gets a turn between slices)."""
        generation = self._tokens.refresh()
        for i, grant in enumerate(list(self._open)):
            if i and i % _SLICE == 0:
                await asyncio.sleep(0)
            if grant.admitted_under(generation) or grant not in self._open:
                continue  # unchanged, or its call ended meanwhile
            if grant.revoked():
                grant.end()  # its handler's own next check fails too
                ending = asyncio.get_running_loop().create_task(
                    self._end(self._open.pop(grant)), context=contextvars.Context()
                )
                self._ending.add(ending)
                ending.add_done_callback(self._ending.discard)

    async def _end(self, end: Callable[[], Awaitable[bool]]) -> None:
        try:
            ended = await end()  # False: it had failed by itself meanwhile (its own check)
        except Exception as exc:  # it had ended otherwise meanwhile (its client went away)
            log.debug("a revoked call had ended before it could be ended: %r", exc)
            ended = False
        self.ended += ended

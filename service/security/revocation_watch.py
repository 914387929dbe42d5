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
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from service.security.tokens import TokenFile

if TYPE_CHECKING:
    from service.security.call_auth import Grant

log = logging.getLogger(__name__)

WATCH_EVERY_S = 1.0  # as the tokens file is looked at: a revoked call ends within ~2 s


class RevocationWatch:
    def __init__(self, tokens: TokenFile, every_s: float | None = None) -> None:
        self._tokens = tokens
        self._every_s = WATCH_EVERY_S if every_s is None else every_s
        self._open: dict[Grant, Callable[[], Awaitable[bool]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.ended = 0  # calls this watch ended

    def __len__(self) -> int:
        return len(self._open)

    def watch(self, grant: Grant, end: Callable[[], Awaitable[bool]]) -> None:
        """Look at `grant` until `unwatch`; `end()` ends its call if it is revoked first
        (False: it had ended already)."""
        self._open[grant] = end
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="seqserve-revocation-watch"
            )

    def unwatch(self, grant: Grant) -> None:
        self._open.pop(grant, None)

    async def close(self) -> None:
        """Stop watching (the server stopped: its calls are over)."""
        self._open.clear()
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._task = None  # (one cancelled before it ran never reached its `finally`)

    async def _run(self) -> None:
        try:
            while self._open:
                await asyncio.sleep(self._every_s)
                generation = self._tokens.refresh()
                for grant in list(self._open):
                    if grant.admitted_under(generation) or grant not in self._open:
                        continue  # unchanged, or its call ended while another was ended
                    if grant.revoked():
                        await self._end(self._open.pop(grant))
        finally:
            self._task = None  # (no await between the loop's test and here: `watch` starts anew)

    async def _end(self, end: Callable[[], Awaitable[bool]]) -> None:
        try:
            ended = await end()  # False: it had failed by itself meanwhile (its own check)
        except Exception as exc:  # it had ended otherwise meanwhile (its client went away)
            log.debug("a revoked call had ended before it could be ended: %r", exc)
            ended = False
        self.ended += ended

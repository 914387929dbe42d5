"""When a replica stops refusing a damaged session of the shared state tier: once the tier no
longer holds it.

A replica that took a session over and found its checkpoint or journal damaged refuses it to
its owner from then on (`Takeover._refuse`: DATA_LOSS), without claiming it again at each
request. The session ends in the tier: its TTL lapses there (nothing of it is left), or another
replica ends it (a tombstone says why). The sweeper asks the tier about each such session at
most every `LOOK_SECONDS`, and about at most `LOOKS_PER_SWEEP` of them in one sweep, off the
event loop; once the tier holds nothing of a session, this replica lifts the refusal. The
session's owner then hears why the tombstone says it ended, or, with no tombstone, that it
expired, as on the replica that held it (`Takeover._gone`); anyone else hears NOT_FOUND.

Sessions refused for something this replica lacks (their version) are not refused for good:
each request asks the tier again, so they are left alone here.
"""

from __future__ import annotations

import asyncio
import heapq
import logging

from service.engine.background import Slices
from service.errors import JournalUnavailable, SeqServeError
from service.sessions.session_store import SessionStore
from service.sessions.shared_tier import Claimed, SharedState

log = logging.getLogger(__name__)

LOOK_SECONDS = 2.0  # between two looks at one refused session, on the store's clock
LOOKS_PER_SWEEP = 8  # refused sessions a sweep asks the tier about (1 or 2 calls each), at most


class SharedRefusals:
    def __init__(self, state: SharedState, sessions: SessionStore) -> None:
        self._state = state
        self._sessions = sessions
        self._due: dict[str, float] = {}  # refused for good → when the tier is next asked
        self._garbled: set[str] = set()  # those whose last look got an answer it cannot read

    async def sweep(self, slices: Slices) -> int:
        """Lift the refusal of each session due for a look that the tier no longer holds;
        returns how many. The ones due longest are looked at first, so every refused session
        gets its turn however many there are."""
        refused = self._sessions.broken
        if not (refused or self._due):
            return 0
        for lifted in self._due.keys() - refused.keys():
            del self._due[lifted]
            self._garbled.discard(lifted)
        now = self._sessions.clock()
        for session_id in refused.keys() - self._due.keys():
            if self._sessions.refused_for_good(session_id):
                self._due[session_id] = now + LOOK_SECONDS
        due = heapq.nsmallest(LOOKS_PER_SWEEP, self._due.items(), key=lambda item: item[1])
        ended = 0
        for session_id, when in due:
            if when > now:
                break
            await slices.breathe()
            if session_id not in self._due:
                continue  # lifted meanwhile (closed, or taken over again)
            self._due[session_id] = self._sessions.clock() + LOOK_SECONDS
            try:
                gone = await self._gone(session_id)
            except JournalUnavailable:
                return ended  # the tier is unreachable: asked again at the next look
            except SeqServeError:
                continue  # the tier holds it again, and it is damaged: still refused
            except Exception as exc:  # a tier answer this replica cannot read: looked at later
                self._unreadable(session_id, exc)
                continue
            self._garbled.discard(session_id)
            if gone is None or not self._sessions.refused_for_good(session_id):
                continue  # still in the tier, or no longer refused meanwhile
            self._due.pop(session_id, None)
            why = gone.ended or "expired"
            log.info("refused session %s ended in the state tier (%s)", session_id, why)
            self._sessions.ended_earlier(session_id, why, gone.ended_owner)
            ended += 1
        return ended

    def _unreadable(self, session_id: str, exc: Exception) -> None:
        """Log a look that got an answer this replica cannot read: with its traceback the
        first time, then at debug level while the looks keep failing (one every
        `LOOK_SECONDS` until the session's TTL lapses in the tier)."""
        if session_id in self._garbled:
            log.debug("refused session %s: the state tier's answer still cannot be read (%s)",
                      session_id, exc)  # fmt: skip
            return
        self._garbled.add(session_id)
        log.error("could not learn whether refused session %s is still in the state tier "
                  "(logged once while it lasts)", session_id, exc_info=exc)  # fmt: skip

    async def _gone(self, session_id: str) -> Claimed | None:
        """What the tier says of a session it no longer holds (its tombstone, if any); None
        while it holds it. Only a session that is gone is read, which costs one key: a held
        one's records, damaged, would be read whole at each look."""
        if await asyncio.to_thread(self._state.epoch_of, session_id):
            return None
        found = await asyncio.to_thread(self._state.peek, session_id)
        return found if found.epoch == 0 else None

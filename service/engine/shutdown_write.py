"""A shutdown's write: every session still in memory to the spill tier, so that a server
started on the same directory resumes each one (README: Restarts).

It runs on a thread of its own while the event loop still answers, once the schedulers have
stopped: every slot holds its last completed step. The residency is frozen first (nothing comes
into memory, no session ends: a close gets UNAVAILABLE), and the states of each batch of
`SPILL_BATCH` sessions are read together before they are written one by one.
"""

from __future__ import annotations

import logging
import threading

from service.engine.session_residency import SessionResidency
from service.errors import SeqServeError, SessionMoved
from service.runtime.state_pool import SlotSnapshot
from service.sessions.session import Session

log = logging.getLogger("service.engine.session_residency")  # where these logs always were

# Sessions whose states are read together before they are written one by one.
SPILL_BATCH = 64


def spill_all(residency: SessionResidency, stop: threading.Event | None = None) -> tuple[int, int]:
    """Write every session still in memory (busy or not), then fsync. → (written, lost). Once
    `stop` is set (out of time) it writes no more: the rest count as lost, and it returns
    before the engine goes on to close the versions whose slots it reads."""
    residency.freeze()
    written = lost = 0
    resident = list(residency.sessions.resident())
    states: dict[str, SlotSnapshot] = {}
    for done, session in enumerate(resident):
        if stop is not None and stop.is_set():
            return written, lost + len(resident) - done
        if done % SPILL_BATCH == 0:  # the next batch's states, read together
            batch = resident[done : done + SPILL_BATCH]
            states = residency.writer.states(
                [s for s in batch if _in_memory(s) and residency.needs_record(s)]
            )
        if not _in_memory(session):
            continue  # let go meanwhile (taken over by another replica): not this one's
        try:
            residency.spill(session, state=states.get(session.session_id))
            written += 1
        except SessionMoved:
            pass  # another replica holds it: nothing of it is this replica's to write
        except SeqServeError as exc:
            lost += 1
            log.error("session %s could not be spilled: %s", session.session_id, exc.message)
    return written, lost


def _in_memory(session: Session) -> bool:
    return session.slot is not None and not session.closed

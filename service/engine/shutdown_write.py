"""A shutdown's write: every session still in memory to the spill tier, so that a server
started on the same directory resumes each one (README: Restarts).

It runs on a thread of its own while the event loop still answers, once the schedulers have
stopped: every slot holds its last completed step. The residency is frozen first (nothing comes
into memory, no session ends: a close gets UNAVAILABLE), and the states of each batch of
`SPILL_BATCH` sessions are read together before they are written one by one. Then
(`write_for_restart`) the tier is flushed and the clean stop marked, and the journal closed;
its segments go when every session is in a checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from service.engine.replay import PendingReplays
from service.engine.session_residency import SessionResidency
from service.errors import SeqServeError, SessionMoved
from service.runtime.state_pool import SlotSnapshot
from service.sessions.session import Session
from service.sessions.state_tier import Checkpoints, JournalLog

log = logging.getLogger("service.engine.session_residency")  # where these logs always were
engine_log = logging.getLogger("service.engine.session_engine")  # where these logs always were

# Sessions whose states are read together before they are written one by one.
SPILL_BATCH = 64


async def write_for_restart(
    residency: SessionResidency,
    tier: Checkpoints,
    journal: JournalLog | None,
    replays: PendingReplays,
    timeout: float,
) -> None:
    """Write every session in memory (`spill_all`, within `timeout`), then flush `tier` and
    mark the clean stop, and close the journal. Its segments are dropped only when nothing
    needs them: every session written and flushed, and no replay left pending (`replays`,
    stopped: what is left stays journaled)."""
    written, lost = await _write_all(residency, timeout)
    synced = False
    if lost == 0:
        try:
            await asyncio.to_thread(tier.sync)
            await asyncio.to_thread(tier.mark_clean_stop, residency.sessions.wall_clock())
            synced = True
        except OSError as exc:  # the checkpoints may not be on disk: keep the journal
            engine_log.error("could not flush the spill tier at shutdown: %s", exc)
    engine_log.info("spilled %d sessions to %s for a restart", written, tier.directory)
    if lost:
        kept = "their steps stay in the journal" if journal else "they are lost"
        engine_log.error("%d sessions could not be written at shutdown; %s", lost, kept)
    if journal is not None:
        journal.close()
        if synced and not replays:  # all in checkpoints: no journal needed
            await asyncio.to_thread(journal.drop_before, journal.segment + 1)


async def _write_all(residency: SessionResidency, timeout: float) -> tuple[int, int]:
    """Spill every session in memory, within `timeout` whatever the disk does."""
    stop = threading.Event()
    residency.freeze()  # before the thread starts: no close or restore races it
    work = asyncio.ensure_future(asyncio.to_thread(spill_all, residency, stop))
    try:
        return await asyncio.wait_for(asyncio.shield(work), timeout)
    except TimeoutError:
        engine_log.error("writing sessions at shutdown took over %.0f s", timeout)
        stop.set()  # it stops after the session it is writing: nothing closes under it
        return await work


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

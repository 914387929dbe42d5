"""The idle-checkpoint sweep: sessions in memory that have gone idle with journaled steps get a
checkpoint, so their journal records can go (DESIGN §10, bounded replay).

The sweep shares the event loop with requests: it runs in `Slices`, chooses each batch after a
pause (a request may have used, closed or moved a session meanwhile), and writes a batch stage
by stage. How a record is written is `CheckpointWriter`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from service.engine.background import Slices
from service.engine.checkpoint_writer import CheckpointWriter
from service.errors import SeqServeError, SessionMoved
from service.sessions.session import Session

log = logging.getLogger("service.engine.session_residency")  # where these logs always were

# Idle checkpoints written together, stage by stage (see `write_batch`): ~8 x 0.25 ms, about
# one of the sweep's slices.
CHECKPOINT_BATCH = 8
# Candidates a sweep looks at between two chances to breathe: passing over a session not due
# costs ~0.5 µs, so 20,000 sessions with recent steps held the loop for 9 ms in one go
# (in-process, a sweep with nothing due, a ticker task timing the longest gap between its
# ticks). 2,048 of them: ~1 ms.
SCAN_STRIDE = 2048


class IdleCheckpoints:
    def __init__(self, writer: CheckpointWriter) -> None:
        self._writer = writer
        self._sessions = writer.sessions

    async def sweep(self, min_idle_seconds: float, slices: Slices | None = None) -> int:
        """Checkpoint sessions in memory idle this long with journaled steps: their journal
        records are released. It runs in `slices`, letting requests in between (each write
        is a file's worth of system calls; a thousand of them in one go stall every session),
        a batch of `CHECKPOINT_BATCH` at a time. Returns how many were written."""
        slices = slices or Slices()
        candidates = iter(self._sessions.unsaved())
        written = 0
        while True:
            await slices.breathe()  # then the batch is chosen: requests ran meanwhile
            batch, exhausted = self._next_due(candidates, min_idle_seconds)
            if batch:
                done, refused = self.write_batch(batch)
                written += done
                if refused:
                    return written  # the disk refuses: try again at the next sweep
            if exhausted:
                return written

    def _next_due(
        self, candidates: Iterator[Session], min_idle_seconds: float
    ) -> tuple[list[Session], bool]:
        """Up to `CHECKPOINT_BATCH` sessions due for an idle checkpoint, looking at no more
        than `SCAN_STRIDE` candidates: the sessions not due yet take time to pass over too.
        → (those found, whether the candidates ran out)."""
        batch: list[Session] = []
        for _ in range(SCAN_STRIDE):
            session = next(candidates, None)
            if session is None:
                return batch, True
            if self._idle_unsaved(session, min_idle_seconds):
                batch.append(session)
                if len(batch) == CHECKPOINT_BATCH:
                    break
        return batch, False

    def _idle_unsaved(self, session: Session, min_idle_seconds: float) -> bool:
        """In memory, not in use, idle this long, with journaled steps not in a checkpoint."""
        sessions = self._sessions
        return (
            sessions.peek(session.session_id) is session  # not ended, moved or replaced
            and session.slot is not None
            and not session.busy
            and sessions.is_unsaved(session)
            and sessions.clock() - session.last_used >= min_idle_seconds
        )

    def write_batch(self, batch: list[Session]) -> tuple[int, bool]:
        """Checkpoint each session of `batch`, stage by stage: every state (read together:
        `CheckpointWriter.states`), then every header, then every write. → (written, whether
        the tier refused a write; the rest of the batch is then not written)."""
        writer = self._writer
        states = writer.states(batch)
        records = [writer.checkpoint_record(s, states[s.session_id]) for s in batch]
        written = 0
        for session, record in zip(batch, records, strict=True):
            try:
                writer.save(session, record)
            except SessionMoved:
                continue  # another replica holds it; the next request here drops this copy
            except SeqServeError as exc:
                log.warning("checkpoint of an idle session failed: %s", exc.message)
                return written, True
            written += 1
        return written, False

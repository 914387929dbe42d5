"""Replaying journaled steps, after a restart, while the server already serves.

Recovery (`recovery.py`) reads the journal before the server reports SERVING and leaves every
session with records after its checkpoint at its final position, with its random stream moved
on past the journaled draws; what it does not yet have is the state those steps make. That is
computed here, from the base state (the checkpoint, or a new session's zero state) and the
journaled inputs, each step alone through the kernel its live step ran (`chunk_replay`: bit for
bit the live state and reply where that step ran alone), then written as a new checkpoint (past
the spill tier's cap if need be, as a shutdown's writes are: the sessions existed before, so
refusing them would lose availability and free nothing):
- in the background, in batches, right after start-up;
- at once, for one session, when a request needs it first (`settle`): the lease waits for it,
  so a request never sees a session that is not replayed.
A session with a replay pending is never in memory, never evicted and never expires (one that
only has its checkpoint checked can expire: it has no steps to lose); its journal segment stays
pinned until its new checkpoint is written. Replays do not hold the state pool:
serving goes on beside them. A session whose base cannot be read is refused with DATA_LOSS,
unless its checkpoint's state is damaged and the journal holds its whole history (`history`):
then that rebuilds it from a new session's state, and the new checkpoint replaces the damaged
one. So that damage is found while the history is still there, a session whose whole history
is journaled but nothing since its checkpoint has its checkpoint read here too (nothing is
written when it reads back whole).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Any

from service.engine.replay_plan import Replay
from service.engine.served_version import ServedVersion
from service.engine.served_versions import ServedVersions
from service.engine.session_residency import SessionResidency
from service.errors import SeqServeError, SessionLost, SessionMoved, SpillCorrupted, Unavailable
from service.runtime.chunk_replay import ReplayRow, replay_rows
from service.runtime.state_pool import SlotSnapshot
from service.runtime.step_batch import RowResult
from service.sessions.session import Session
from service.sessions.session_store import SessionStore

log = logging.getLogger(__name__)

_BATCH_SESSIONS = 256  # sessions replayed per background batch
_WRITES_PER_TURN = 32  # checkpoints written before the event loop gets a turn
_RETRY_SECONDS = 1.0  # after a background batch failed (the disk refused a checkpoint)


@dataclass
class _Pending:
    session: Session
    fresh: bool  # no checkpoint: the base is a new session's zero state
    replay: Replay
    # Its whole history, from its creation to `replay.end`, when the journal holds it (a
    # checkpointed session): what rebuilds it should its checkpoint's state prove damaged.
    history: Replay | None = None
    task: asyncio.Task[None] | None = None  # the replay running it

    @property
    def check_only(self) -> bool:
        """Nothing to replay on its checkpoint, only the checkpoint's state to check."""
        return not self.fresh and self.replay.empty


@dataclass
class _Computed:
    state: SlotSnapshot | None = None  # None: its base could not be read, or it ended
    # meanwhile (`problem` says why)
    result: RowResult | None = None  # the last feed's outcome, when the last request was one
    problem: str | None = None
    rebuilt: str | None = None  # rebuilt from its history: why its checkpoint was not used
    damaged: bool = False  # its checkpoint is damaged (rebuilt, or lost)
    checked: bool = False  # its checkpoint read back whole, and nothing to replay on it
    moved: bool = False  # another replica holds it now (its checkpoint's epoch moved on)


class PendingReplays:
    """Sessions whose journaled steps are still to be replayed, and the replays running."""

    def __init__(
        self,
        sessions: SessionStore,
        versions: ServedVersions,
        residency: SessionResidency,
        batch_sessions: int = _BATCH_SESSIONS,
    ) -> None:
        self._sessions = sessions
        self._versions = versions
        self._residency = residency
        self._batch = batch_sessions
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain: asyncio.Task[None] | None = None
        self._stopping = False
        self.replayed_sessions = 0
        self.replayed_steps = 0
        self.rebuilt_sessions = 0  # from their history, their checkpoint's state damaged
        self._checks = 0  # pending entries that are `check_only`

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def replaying(self) -> int:
        """Sessions with journaled steps still to replay (not those only to be checked)."""
        return len(self._pending) - self._checks

    def add(
        self, session: Session, replay: Replay, *, fresh: bool, history: Replay | None = None
    ) -> None:
        """Recovery found `session` at `replay.end` with the records of `replay` to apply
        (none: only its checkpoint to check, `history` at hand)."""
        pending = _Pending(session, fresh, replay, history)
        replaced = self._pending.get(session.session_id)
        self._checks += pending.check_only - (replaced is not None and replaced.check_only)
        self._pending[session.session_id] = pending

    # ---- while serving ---------------------------------------------------------------------

    async def settle(self, session: Session) -> None:
        """Return once `session` has no replay pending: the one running it finishes, or it is
        replayed now. Raises what its replay raised (the session then stays pending)."""
        while (pending := self._pending.get(session.session_id)) is not None:
            if self._stopping:
                raise Unavailable("server is shutting down; retry on another replica")
            task = pending.task if pending.task is not None else self._launch([pending])
            await asyncio.shield(task)

    def start(self) -> None:
        """Replay everything pending in the background (batches of sessions of one version)."""
        if self._pending:
            self._drain = asyncio.get_running_loop().create_task(
                self._drain_all(), name="journal-replay", context=contextvars.Context()
            )

    async def stop(self) -> None:
        """Start no more replays; wait for the running ones (each is one bounded batch)."""
        self._stopping = True
        running = [*self._tasks, *([self._drain] if self._drain is not None else [])]
        await asyncio.gather(*running, return_exceptions=True)

    async def wait(self) -> None:
        """Return once the background replay has ended (nothing pending, or stopping)."""
        if self._drain is not None:
            await asyncio.shield(self._drain)

    async def _drain_all(self) -> None:
        started = time.perf_counter()
        while not self._stopping:
            batch = self._next_batch()
            if not batch:
                if not self._tasks:
                    break
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
                continue
            try:
                await asyncio.shield(self._launch(batch))
            except SeqServeError as exc:
                log.warning("journal replay failed, retrying: %s", exc.message)
                await asyncio.sleep(_RETRY_SECONDS)
        if not self._pending:
            log.info(
                "replayed %d sessions (%d steps) from the journal in %.1f s while serving",
                self.replayed_sessions, self.replayed_steps, time.perf_counter() - started,
            )  # fmt: skip

    def _next_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        for pending in self._pending.values():
            if pending.task is not None:
                continue
            if batch and (pending.session.model, pending.session.version) != (
                batch[0].session.model,
                batch[0].session.version,
            ):
                continue
            batch.append(pending)
            if len(batch) == self._batch:
                break
        return batch

    def _launch(self, batch: list[_Pending]) -> asyncio.Task[None]:
        # A fresh context: a replay serves whoever waits for it, not the request that began it.
        task = asyncio.get_running_loop().create_task(
            self._replay(batch), context=contextvars.Context()
        )
        for pending in batch:
            pending.task = task
        self._tasks.add(task)

        def done(_task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            for pending in batch:
                if pending.task is task:
                    pending.task = None

        task.add_done_callback(done)
        return task

    # ---- one batch -------------------------------------------------------------------------

    async def _replay(self, batch: list[_Pending]) -> None:
        first = batch[0].session
        served = await self._versions.get(first.model, first.version)  # pinned: loaded
        computed = await asyncio.to_thread(self._compute, served, batch)
        written: list[tuple[_Pending, Any]] = []
        for pending, got in zip(batch, computed, strict=True):
            session = pending.session
            if session.closed:
                self._forget(pending)
                continue
            if got.moved:  # not lost: the caller's retry takes it back from the tier
                self._let_go(pending)
                continue
            if got.damaged:
                self._residency.damaged(session.session_id)
            if got.state is None:
                assert got.problem is not None
                self._forget(pending)
                lose(self._sessions, self._residency, session, got.problem)
                continue
            if got.checked:  # nothing to write: its journal records are no longer needed
                self._forget(pending)
                self._residency.durability.checkpointed(session)
                continue
            replay = pending.replay
            if got.rebuilt is not None:
                assert pending.history is not None
                log.warning(
                    "session %s: %s; rebuilt from its journal (the %d inputs since its creation)",
                    session.session_id, got.rebuilt, pending.history.end,
                )  # fmt: skip
                self.rebuilt_sessions += 1
                if replay.seen_request:  # the last request's reply is the history's last row
                    replay = pending.history
            applied = replay.applied(session, got.result, served.tokenizer)
            self._sessions.remember(session, applied)
            written.append((pending, self._residency.writer.checkpoint_record(session, got.state)))
        for k, (pending, record) in enumerate(written):
            if k and k % _WRITES_PER_TURN == 0:
                await asyncio.sleep(0)  # serving goes on between chunks of writes
            session = pending.session
            if session.closed or self._pending.get(session.session_id) is not pending:
                continue  # ended, or dropped and taken back, while this batch ran
            try:
                # Past the tier's cap if need be, as a shutdown's writes are: these sessions
                # existed before the restart (in memory then, most of them, which the cap never
                # counted), so the pool they held bounds how far past it this goes; refused,
                # they would stay pending, every request for them refused, the cap never freed.
                # The disk refusing it still leaves it pending (retried).
                self._residency.writer.write_record(record, past_cap=True)
            except SessionMoved:  # another process took it over meanwhile: not ours to write
                self._let_go(pending)
                continue
            self._residency.durability.checkpointed(session)  # its journal records go
            self._forget(pending)
            self.replayed_sessions += 1
            self.replayed_steps += pending.replay.end - pending.replay.base

    def _let_go(self, pending: _Pending) -> None:
        """Another process holds the session now: this copy, and its replay, go."""
        self._forget(pending)
        self._residency.let_go(pending.session)
        self._residency.durability.checkpointed(pending.session)

    def _forget(self, pending: _Pending) -> None:
        """No replay pending for it any more (only this entry: a newer one for the id stays)."""
        sid = pending.session.session_id
        if self._pending.get(sid) is pending:
            del self._pending[sid]
            self._checks -= pending.check_only
        self._sessions.set_replay_pending(pending.session, False)

    def _compute(self, served: ServedVersion, batch: list[_Pending]) -> list[_Computed]:
        """Off the event loop: read each base, run the journaled inputs through the model."""
        computed = [_Computed() for _ in batch]
        rows: list[ReplayRow] = []
        live: list[int] = []
        for k, pending in enumerate(batch):
            if pending.session.closed:  # ended meanwhile (its checkpoint deleted): nothing to do
                continue
            replay = pending.replay
            try:
                base = self._base(served, pending)
            except SpillCorrupted as exc:
                computed[k].damaged = True
                if pending.history is None:
                    computed[k].problem = f"its checkpoint cannot be read: {exc.message}"
                    continue
                base, replay = served.pool.fresh_snapshot(), pending.history
                computed[k].rebuilt = f"its checkpoint cannot be read: {exc.message}"
            except SessionMoved:  # another replica took it over since: this copy is stale
                computed[k].moved = True
                continue
            except Unavailable:  # the state tier is unreachable: the batch stays pending
                raise
            except SeqServeError as exc:
                computed[k].problem = f"its checkpoint cannot be read: {exc.message}"
                continue
            else:
                if replay.empty and not pending.fresh:
                    computed[k].state, computed[k].checked = base, True
                    continue
            earlier, last = replay.split()
            top_k, per_position = (replay.last or (None,) * 5)[3:5]
            rows.append(ReplayRow(base, earlier, last, top_k or 0, bool(per_position)))
            live.append(k)
        for k, (state, result) in zip(live, replay_rows(served.runner, rows), strict=True):
            computed[k].state, computed[k].result = state, result
        return computed

    def _base(self, served: ServedVersion, pending: _Pending) -> SlotSnapshot:
        if pending.fresh:
            return served.pool.fresh_snapshot()
        record = self._residency.tier.read(pending.session.session_id)
        if record.header.position != pending.replay.base:
            raise SessionLost(
                f"its checkpoint is at position {record.header.position}, its journal starts "
                f"from {pending.replay.base}"
            )
        return record.state


def lose(
    sessions: SessionStore,
    residency: SessionResidency,
    session: Session,
    why: str,
    error: type[SeqServeError] = SessionLost,
) -> None:
    """Refuse the session from now on (DATA_LOSS, or `error`), naming why."""
    log.error("session %s cannot be recovered: %s", session.session_id, why)
    if sessions.contains(session.session_id):
        residency.durability.checkpointed(session)  # its journal records are not needed
        residency.discard(session)
        sessions.remove(session, "lost")
        residency.versions.unpin(session.model, session.version)
    sessions.mark_broken(session.session_id, why, error, owner=session.owner)

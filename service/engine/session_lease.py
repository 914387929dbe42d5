"""The session lease: the one place that decides who runs on a session, and when.

Every request that uses a session's state (a step, a generation, a fork, a close) holds the
session's lease while it runs:

    async with leases.hold(session_id, line) as lease:
        ...  # lease.session, lease.version: loaded, the state in memory

Taking a lease looks the session up (never ending it: expiry is the sweeper's), and refuses
with ABORTED when another request holds it: requests on one session never interleave. The one
exception is a *line*, one caller's ordered requests (a Stream's items): a request whose line
holds the lease waits its turn instead, and turns go in the order they were taken. `take` is
synchronous, so a caller keeps its order by taking leases in arrival order. Once it is its
turn, the lease waits for the session's journal replay if one is still pending after a restart,
loads the session's version and restores its state from the spill tier.

A lease is let go when its holder is done, unless a step or generation it started may still
write the session's slot (its caller was cancelled mid-step): then it is let go when that
settles, so nothing evicts, moves or frees the slot under a running step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from service.engine.durability import Durability
from service.engine.replay import PendingReplays
from service.engine.served_version import ServedVersion
from service.engine.served_versions import ServedVersions
from service.engine.session_line import Line
from service.engine.session_residency import SessionResidency
from service.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    PositionMismatch,
    SeqServeError,
    SessionClosed,
    VersionGone,
)
from service.runtime.step_batch import Row, RowResult
from service.sessions import journal_record
from service.sessions.session import AppliedRequest, Session
from service.sessions.session_store import SessionStore

log = logging.getLogger(__name__)


class Lease:
    __slots__ = (
        "_durability", "_generated", "_store", "_turn", "granted", "in_flight", "line",
        "request_id", "session", "version",
    )  # fmt: skip

    def __init__(
        self, session: Session, line: Line | None, store: SessionStore, durability: Durability
    ) -> None:
        self.session = session
        self.line = line
        self.version: ServedVersion | None = None  # set once it is ready
        self.granted = False  # it is this lease's turn (the session is busy on its behalf)
        # A step or generation that may still write the slot; the lease outlives it.
        self.in_flight: asyncio.Future[Any] | None = None
        self._store = store
        self._durability = durability
        self.request_id = ""  # the request running on it, named in its journal records
        self._turn: asyncio.Future[None] | None = None  # resolved when a waiting lease's turn comes
        # The encoder of its generation's journal records (made at its first generated token).
        self._generated: journal_record.GeneratedRecords | None = None

    @property
    def served(self) -> ServedVersion:
        assert self.version is not None, "the lease is not ready"
        return self.version

    def record(self, row: Row, result: RowResult) -> bytes:
        """The journal record of this session's row in a step (before `advance`)."""
        session = self.session
        if row.inputs is None:  # a generated token, fed back in
            assert result.token is not None and row.sampling is not None
            draws = 0 if row.sampling.temperature == 0.0 else 1
            records = self._generated
            if records is None or records.request_id != self.request_id:
                records = self._generated = journal_record.GeneratedRecords(
                    session.session_id, self.request_id
                )
            return records.record(session.position, result.token, draws)
        inputs = row.inputs
        if inputs.ndim == 1 and inputs.shape[0] == 1:  # one token: no array on the way
            return journal_record.one_token(
                session.session_id, session.position, int(inputs.item()), self.request_id,
                row.top_k, row.per_position,
            )  # fmt: skip
        values = inputs.detach().cpu().numpy()
        encode = journal_record.tokens if values.ndim == 1 else journal_record.frames
        return encode(
            session.session_id, session.position, values, self.request_id, row.top_k,
            row.per_position,
        )  # fmt: skip

    def journal_generation(self, request_id: str, sampling: dict[str, Any]) -> None:
        """Journal that a generation starts here (its own write), so a retry after a restart
        can continue it. Raises JournalUnavailable; nothing is applied then."""
        self._durability.generation_started(self.session, request_id, sampling)

    def remember(self, request_id: str, position: int, reply: Any) -> None:
        """Keep `reply` for a retry of request `request_id` (applied at `position`)."""
        applied = AppliedRequest(request_id, position, reply) if request_id else None
        self._store.remember(self.session, applied)

    def precondition(self, expected: int | None, request_id: str) -> AppliedRequest | None:
        """Check `expected` against the session's position: None, the request applies; the
        session's last applied request, when this is a retry of it; else PositionMismatch."""
        session = self.session
        if expected is None or expected == session.position:
            return None
        last = session.last_request
        if (
            request_id
            and last is not None
            and (last.request_id, last.position)
            == (
                request_id,
                expected,
            )
        ):
            return last
        raise PositionMismatch(
            f"session {session.session_id!r} is at position {session.position}, not {expected}",
            session.position,
        )

    def advance(self, consumed: int, segment: int | None = None) -> int:
        """Count inputs the step consumed into the session's state (journaled in `segment`,
        None without a journal); the new position."""
        if segment is not None:
            self._durability.journaled(self.session, segment)
        return self._store.advance(self.session, consumed)


class SessionLeases:
    def __init__(
        self,
        sessions: SessionStore,
        versions: ServedVersions,
        residency: SessionResidency,
        durability: Durability,
        replays: PendingReplays,
    ) -> None:
        self._sessions = sessions
        self._durability = durability
        self.replays = replays
        self._versions = versions
        self._residency = residency
        self._holders: dict[str, Lease] = {}
        self._waiting: dict[str, deque[Lease]] = {}

    @contextlib.asynccontextmanager
    async def hold(
        self, session_id: str, line: Line | None = None, *, bring_in: bool = True
    ) -> AsyncIterator[Lease]:
        """Hold the session's lease for the block; `bring_in` loads its version and restores
        its state first (closing a session needs neither)."""
        lease = self.take(session_id, line)
        try:
            if bring_in:
                await self.ready(lease)
            else:
                if lease._turn is not None:
                    await lease._turn
                await self.replays.settle(lease.session)
                if lease.session.closed:  # lost in its replay, or ended meanwhile: say which
                    self._sessions.get(lease.session.session_id)
                    raise SessionClosed(f"session {lease.session.session_id!r} was closed")
            yield lease
        finally:
            self.release(lease)

    def take(self, session_id: str, line: Line | None = None) -> Lease:
        """The session's lease, or a place in its line. Raises what `SessionStore.get` raises
        for a missing session, and Aborted when another caller holds it."""
        session = self._sessions.get(session_id)
        lease = Lease(session, line, self._sessions, self._durability)
        holder = self._holders.get(session_id)
        if holder is None:
            self._grant(lease)
        elif line is not None and holder.line is line:
            lease._turn = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(session_id, deque()).append(lease)
        else:
            raise Aborted(
                f"session {session_id!r} has a request in progress; send one request at a "
                "time per session"
            )
        return lease

    def ready_now(self, lease: Lease) -> ServedVersion | None:
        """The fast path: the version, when the lease is granted and the session is in memory
        on a loaded version; None when `ready` has work to do."""
        session = lease.session
        if not lease.granted or session.closed or session.slot is None:
            return None
        version = self._versions.find(session.model, session.version)
        if version is None or version.unloading:
            return None
        lease.version = version
        return version

    async def ready(self, lease: Lease) -> ServedVersion:
        """Wait for the lease's turn, load the session's version and bring its state into
        memory. On failure the lease is released and the error raised."""
        try:
            if lease._turn is not None:
                await lease._turn
            session = lease.session
            await self.replays.settle(session)
            if session.closed:  # lost in its replay (DATA_LOSS), closed, expired: say which
                self._sessions.get(session.session_id)
                raise SessionClosed(f"session {session.session_id!r} is closed")
            try:
                version = await self._versions.get(session.model, session.version)
            except NotFound as exc:
                raise VersionGone(
                    f"session {session.session_id!r} runs on {session.model}:{session.version}, "
                    f"which can no longer be loaded: {exc.message}"
                ) from exc
            if version.unloading:
                raise FailedPrecondition(f"{session.model}:{session.version} is unloading")
            if session.slot is None:
                await self._residency.restore(session, version)
        except BaseException:
            self.release(lease)
            raise
        lease.version = version
        return version

    def release(self, lease: Lease) -> None:
        """Let the lease go now, or once its in-flight step settles. Idempotent."""
        if not lease.granted:  # still in line: leave it
            line = self._waiting.get(lease.session.session_id)
            if line is not None and lease in line:
                line.remove(lease)
                if not line:
                    del self._waiting[lease.session.session_id]
            return
        pending = lease.in_flight
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _f: self._let_go(lease))
            return
        self._let_go(lease)

    def release_after(self, leases: list[Lease], step: asyncio.Future[Any]) -> None:
        """Let granted `leases` go once `step` (the group their rows run in) settles: one
        callback for a whole Stream message's feeds."""
        for lease in leases:
            lease.in_flight = step

        def let_go(_done: asyncio.Future[Any]) -> None:
            for lease in leases:
                self._let_go(lease)

        if step.done():
            let_go(step)
        else:
            step.add_done_callback(let_go)

    def _grant(self, lease: Lease) -> None:
        self._holders[lease.session.session_id] = lease
        lease.granted = True
        self._sessions.set_busy(lease.session, True)
        if not lease.session.closed:  # a waiter's turn may come after the holder closed it
            self._sessions.touch(lease.session)

    def _let_go(self, lease: Lease) -> None:
        session = lease.session
        sid = session.session_id
        if self._holders.get(sid) is not lease:
            return  # already let go
        line = self._waiting.get(sid)
        while line:
            following = line.popleft()
            if not line:
                del self._waiting[sid]
            assert following._turn is not None
            if following._turn.done():  # its caller gave up while waiting
                continue
            self._grant(following)
            following._turn.set_result(None)
            return
        del self._holders[sid]
        self._sessions.set_busy(session, False)
        if not session.closed:
            self._sessions.touch(session)
            if self._durability.due(session):  # bound what recovery replays
                try:
                    self._residency.writer.checkpoint(session, periodic=True)
                except SeqServeError as exc:  # the journal still holds its steps
                    log.warning("checkpoint of a session failed: %s", exc.message)
            self._residency.notify_idle()

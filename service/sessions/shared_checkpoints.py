"""The shared tier's checkpoints (`SharedCheckpoints`): the spill-tier interface of the local
tier (`spill_tier.SpillTier`) over a `SharedState` (`shared_tier.py`), each write checked
against the session's epoch.
"""

from __future__ import annotations

from service.errors import SpillCorrupted
from service.sessions import spill_record
from service.sessions.session_store import SessionStore
from service.sessions.shared_tier import SharedState
from service.sessions.spill_directory import TierScan
from service.sessions.spill_record import SpillRecord


class SharedCheckpoints:
    """The spill-tier interface of the local tier (`spill_tier.SpillTier`), over the shared
    tier."""

    def __init__(self, state: SharedState, sessions: SessionStore) -> None:
        self._state = state
        self._sessions = sessions
        self.directory = state.where
        self.bytes_used = 0  # the tier's own metrics say how much

    @property
    def state(self) -> SharedState:
        """The tier itself, for what the spill-tier interface does not ask of it."""
        return self._state

    def open(self) -> TierScan:
        return TierScan()  # nothing to index: sessions are read when taken over

    def close(self) -> None:
        self._state.close()

    def sync(self) -> None:
        pass

    def mark_clean_stop(self, wall_time: float) -> None:
        pass  # expiry runs on the tier's clock, which did not stop

    def write(
        self,
        record: SpillRecord,
        *,
        durable: bool = False,
        first: bool = False,
        past_cap: bool = False,
    ) -> None:
        """The checkpoint, and its session's journal emptied, if this process still holds it
        (`first`: a fork's child, made by this write). The tier has no byte cap (`past_cap`)."""
        sid = record.header.session_id
        if sid in self._state.moved:  # a stale copy: another holds it, or may (`append`)
            raise self._state.fenced([sid])
        session = self._sessions.peek(sid)
        epoch = session.holder_epoch if session is not None else 0
        ttl_ms = int(record.header.ttl_seconds * 1000)
        data = spill_record.encode(record)
        made_by = record.header.made_by if first else ""
        owner = record.header.owner
        if not self._state.checkpoint(
            sid, epoch, ttl_ms, data, first=first, made_by=made_by, owner=owner
        ):
            raise self._state.fenced([sid])

    def read(self, session_id: str) -> SpillRecord:
        """The checkpoint of a session this process holds; SessionMoved when another took it
        over since (this copy is stale: the caller's retry takes it back)."""
        epoch, data = self._state.read_checkpoint(session_id)
        session = self._sessions.peek(session_id)
        if session is not None and epoch != session.holder_epoch:
            raise self._state.fenced([session_id])
        if data is None:
            raise SpillCorrupted(f"checkpoint of session {session_id!r} is missing from the tier")
        return spill_record.decode(bytes(data), f"checkpoint of {session_id}")

    def delete(self, session_id: str) -> None:
        """This process is done with the session (it ended here, or was let go): its end (an
        END record) deletes it in the tier, fenced like every write. With no copy left to be
        stale it leaves `moved`, which would otherwise keep every id a long-running replica
        was ever fenced on (a copy that expired here, or was let go at its eviction)."""
        self._state.moved.discard(session_id)

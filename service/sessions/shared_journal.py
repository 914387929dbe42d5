"""The shared tier's journal (`SharedJournal`): the journal interface of the local tier
(`journal.Journal`) over a `SharedState` (`shared_tier.py`): a batch's records, every session's
epoch checked, written in one atomic step; a session's checkpoint empties its journal.
"""

from __future__ import annotations

from collections.abc import Iterator

from service.sessions import journal_record
from service.sessions.ended_file import Ended
from service.sessions.journal_record import JournalRecord
from service.sessions.journal_scan import Unreadable, decode_stream
from service.sessions.session_store import SessionStore
from service.sessions.shared_tier import SharedState, Write


class SharedJournal:
    """The journal interface of the local tier (`journal.Journal`), over the shared tier."""

    def __init__(self, state: SharedState, sessions: SessionStore) -> None:
        self._state = state
        self._sessions = sessions
        self.oldest = 0
        self.segment = 0

    @property
    def failed_writes(self) -> int:
        return self._state.failed_writes

    @property
    def damaged_records(self) -> int:
        """Found damaged in the journals of sessions taken over (nothing is read at start-up)."""
        return sum(self._state.damaged.values())

    @property
    def refusing(self) -> bool:
        return False  # every replica's journal: one replica's readiness does not follow it

    def probe(self) -> bool:
        return True

    def writes_again(self) -> None:
        pass

    def open(self) -> Iterator[JournalRecord | Unreadable]:
        return iter(())  # sessions are read when taken over, not at start-up

    def ended_sessions(self) -> list[Ended]:
        return []  # the tier keeps why each ended (a tombstone), read at a takeover

    def keep_ended(self, ended: list[Ended]) -> None:
        pass

    def start(self) -> None:
        pass

    def drop_before(self, seq: int) -> None:
        pass

    def close(self) -> None:
        pass

    def sync(self) -> None:
        pass  # the tier's own fsync policy does it

    def pin(self, seq: int) -> None:
        pass  # a checkpoint empties its session's journal itself

    def unpin(self, seq: int) -> None:
        pass

    def append(self, records: list[bytes]) -> int:
        """All of a batch's records, every session's epoch checked, in one atomic step.
        Raises JournalUnavailable (unreachable) or SessionMoved (fenced): nothing written."""
        by_session: dict[str, list[bytes]] = {}
        kinds: dict[str, int] = {}
        for record in records:
            sid = journal_record.session_of(record)
            by_session.setdefault(sid, []).append(record)
            kinds[sid] = journal_record.kind_of(record)
        # A copy known stale (`moved`: refused, or its last write's outcome unknown) writes
        # nothing more at its old epoch, even from a request admitted before it was marked.
        stale = [sid for sid in by_session if sid in self._state.moved]
        if stale:
            raise self._state.fenced(stale)
        writes = []
        for sid, batch in by_session.items():
            session = self._sessions.peek(sid)
            epoch = session.holder_epoch if session is not None else 0
            ttl_ms = int((session.ttl_seconds if session is not None else 600.0) * 1000)
            owner = session.owner if session is not None else ""
            if kinds[sid] == journal_record.END:
                (end,) = decode_stream(batch[-1])
                tombstone = f"{end.why}\n{owner}".encode()  # why it ended, and whose it was
                writes.append(Write(sid, epoch, ttl_ms, "end", [tombstone], owner=owner))
            elif kinds[sid] == journal_record.CREATE:
                made_by = session.made_by if session is not None else ""
                writes.append(Write(sid, epoch, ttl_ms, "create", batch, made_by, owner))
            else:
                writes.append(Write(sid, epoch, ttl_ms, "step", batch, owner=owner))
        fenced = self._state.append(writes)  # raises JournalUnavailable when unreachable
        self._state.reachable()
        if fenced:
            raise self._state.fenced(fenced)
        return 0

"""Owns the live sessions: lookup, idle TTL, the live-session cap and LRU order.

It is also the one module that changes a `Session` record after it is created: its tier
(`set_slot`), its position (`advance`), its busy flag (`set_busy`, for the session lease), its
idle clock (`touch`) and its end (`remove`). Lookups never end a session: one idle past its TTL
is reported expired, and the sweeper ends it.

Two LRU orders are kept: all sessions (for TTL bookkeeping and listing) and the sessions whose
state is in memory (eviction candidates), so picking an eviction victim never walks past the
spilled ones. The periodic chores cost what they find, not what is held: the expiry sweep walks
the LRU order only while a session there could be past the shortest TTL held, and the idle
checkpoint looks only at the sessions with journaled steps (`unsaved`). A million idle sessions
cost the sweep nothing. The clock is injectable so TTL behaviour is testable without sleeping.

What a request for an id no longer here hears (ended, moved, refused at start-up) is kept by
`service.sessions.ended_sessions`.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

from service.errors import (
    SeqServeError,
    SessionExpired,
    SessionLimit,
    SessionNotFound,
    SpillCorrupted,
    quote,
)
from service.security.principal import may_see
from service.sessions.ended_sessions import EndedSessions
from service.sessions.session import AppliedRequest, Session
from service.sessions.ttl_index import TtlIndex


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_sessions = max_sessions
        self.clock = clock
        self.wall_clock = wall_clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._resident: OrderedDict[str, Session] = OrderedDict()  # in memory, LRU first
        # The same, by (model, version): an eviction looks for a version's oldest idle one.
        self._resident_by: dict[tuple[str, int], OrderedDict[str, Session]] = {}
        self._busy: dict[str, Session] = {}  # held by a lease now
        self._gone = EndedSessions()  # why the ids of sessions no longer here are gone
        self._owned: Counter[str] = Counter()  # owner → live sessions it has here
        self._made: dict[str, Session] = {}  # Session.made_by → the live session
        # Sessions with journaled steps since their checkpoint, in the order they got them.
        self._unsaved: dict[str, Session] = {}
        self._ttls = TtlIndex()  # how far the expiry sweep walks
        # False once a session was adopted out of `last_used` order: the next sweep walks all.
        self._in_order = True

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    @property
    def resident_count(self) -> int:
        return len(self._resident)

    def check_capacity(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimit(
                f"live session limit reached ({self.max_sessions}); close sessions, retry "
                "later, or raise SEQSERVE_SESSIONS__MAX_SESSIONS"
            )

    def owned_by(self, owner: str) -> int:
        """Live sessions `owner` has in this process."""
        return self._owned.get(owner, 0)

    def add(self, session: Session) -> None:
        self.check_capacity()
        self.adopt(session)

    def adopt(self, session: Session) -> None:
        """Add without the cap: sessions found in the spill tier at start-up are kept even if
        the cap was lowered meanwhile (new ones are refused until enough end). A live session
        is not a refused one, whatever was refused of it before (its damaged checkpoint, when
        its journal rebuilt it)."""
        self._gone.revived(session.session_id)
        replaced = self._sessions.get(session.session_id)
        if replaced is not None:
            self._ttls.remove(replaced.ttl_seconds)
        elif self._sessions and session.last_used < self._newest().last_used:
            self._in_order = False  # recovered with an older idle clock than the newest
        self._sessions[session.session_id] = session
        self._ttls.add(session.ttl_seconds)
        if session.unsaved_steps:
            self._unsaved[session.session_id] = session
        if session.owner:
            self._owned[session.owner] += 1
        if session.made_by:
            self._made[session.made_by] = session
        if session.slot is not None:
            self._in_memory(session)

    def made(self, made_by: str) -> Session | None:
        """The live session a create or fork request (`made_by`) made, if any."""
        return self._made.get(made_by)

    def contains(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session:
        """The live session, or the error that says why there is none: not found, closed,
        expired (also when idle past its TTL but not yet swept), or DATA_LOSS when its records
        were refused at start-up. A caller that does not own the session hears NOT_FOUND,
        whatever its state (`security.principal`)."""
        session = self._sessions.get(session_id)
        if session is None:
            self._gone.why_gone(session_id)
        shown = quote(session_id)
        if not may_see(session.owner):
            raise SessionNotFound(f"session {shown} not found")
        if self.is_expired(session):
            raise SessionExpired(f"session {shown} expired after its idle TTL")
        return session

    @property
    def gone(self) -> EndedSessions:
        """Why the ids of sessions no longer here are gone (ended, moved, refused)."""
        return self._gone

    def mark_broken(
        self,
        session_id: str,
        why: str,
        error: type[SeqServeError] = SpillCorrupted,
        owner: str = "",
    ) -> None:
        """Remember a session whose records exist but could not be used: damaged or lost
        (DATA_LOSS, the default), or intact but for other weights (FAILED_PRECONDITION). Only
        its `owner` (when known) hears which."""
        self._gone.mark_broken(session_id, why, error, owner)

    @property
    def broken(self) -> dict[str, str]:
        return self._gone.broken

    def broken_owner(self, session_id: str) -> str:
        """The owner of a session refused since start-up (`mark_broken`); NOT_FOUND, as from
        `get`, for a caller who may not see it."""
        return self._gone.broken_owner(session_id)

    def broken_error(self, session_id: str) -> type[SeqServeError]:
        """Why a session refused since start-up is refused (its error class); NOT_FOUND, as
        `broken_owner`, for a caller who may not see it."""
        return self._gone.broken_error(session_id)

    def refused_for_good(self, session_id: str) -> bool:
        """Refused for damage (`EndedSessions.refused_for_good`), not for what this process
        lacks now."""
        return self._gone.refused_for_good(session_id)

    def close_broken(self, session_id: str) -> None:
        """A refused session was closed: remembered as closed from now on."""
        self._gone.close_broken(session_id)

    def touch(self, session: Session) -> None:
        session.last_used = self.clock()
        sid = session.session_id
        self._sessions.move_to_end(sid)
        if sid in self._resident:
            self._resident.move_to_end(sid)
            self._resident_by[(session.model, session.version)].move_to_end(sid)

    def set_slot(self, session: Session, slot: int | None) -> None:
        """Move a session between tiers: a slot means in memory, None means spilled."""
        session.slot = slot
        if slot is None:
            self._not_in_memory(session)
        elif session.session_id in self._sessions:
            self._in_memory(session)  # a restore is a use: most recent

    def _in_memory(self, session: Session) -> None:
        sid = session.session_id
        self._resident[sid] = session
        self._resident.move_to_end(sid)
        by = self._resident_by.setdefault((session.model, session.version), OrderedDict())
        by[sid] = session
        by.move_to_end(sid)

    def _not_in_memory(self, session: Session) -> None:
        if self._resident.pop(session.session_id, None) is None:
            return
        key = (session.model, session.version)
        by = self._resident_by[key]
        del by[session.session_id]
        if not by:
            del self._resident_by[key]

    def advance(self, session: Session, consumed: int) -> int:
        """Count inputs consumed into the session's state; returns its new position."""
        session.position += consumed
        return session.position

    def journaled(self, session: Session, segment: int, steps: int = 1) -> bool:
        """A record of the session is in the journal (in `segment`), counting `steps` toward
        its checkpoint; True when it is its first since its checkpoint (the caller pins the
        segment)."""
        if steps and not session.unsaved_steps and session.session_id in self._sessions:
            self._unsaved[session.session_id] = session  # its first step since its checkpoint
        session.unsaved_steps += steps
        if session.journal_segment is None:
            session.journal_segment = segment
            return True
        return False

    def checkpointed(self, session: Session, next_due: int = 0) -> int | None:
        """The session's state is in a checkpoint, its next due after `next_due` steps (0: see
        `Session.checkpoint_due`); returns the segment it no longer needs."""
        segment, session.journal_segment = session.journal_segment, None
        session.unsaved_steps = 0
        session.checkpoint_due = next_due
        self._unsaved.pop(session.session_id, None)
        return segment

    def written(self, session: Session) -> None:
        """Its state, position and idle clock as they are now were written to the tier."""
        session.saved_at = session.last_used

    def record_is_current(self, session: Session) -> bool:
        """The tier's record of it was written since its last use and last journaled change:
        writing it again would write the same record."""
        return session.journal_segment is None and session.saved_at == session.last_used

    def is_unsaved(self, session: Session) -> bool:
        """It has journaled steps not yet in a checkpoint."""
        return self._unsaved.get(session.session_id) is session

    def unsaved(self) -> list[Session]:
        """Sessions with journaled steps not yet in a checkpoint, those journaled first first."""
        return list(self._unsaved.values())

    def remember(self, session: Session, applied: AppliedRequest | None) -> None:
        """The request just applied (None: one without a request id, which no retry names)."""
        session.last_request = applied

    def peek(self, session_id: str) -> Session | None:
        """The live session with this id, if this process has it (no expiry check)."""
        return self._sessions.get(session_id)

    def forget(self, session: Session, *, moved: bool = False) -> None:
        """Drop the session from this process. `moved`: another process holds it now (not
        ended): until this one takes it back, its id answers UNAVAILABLE, retry."""
        session.closed = True
        if session.made_by and self._made.get(session.made_by) is session:
            del self._made[session.made_by]
        if self._sessions.pop(session.session_id, None) is not None:
            self._ttls.remove(session.ttl_seconds)
            if session.owner:
                self._owned[session.owner] -= 1
                if self._owned[session.owner] <= 0:
                    del self._owned[session.owner]
        self._not_in_memory(session)
        self._unsaved.pop(session.session_id, None)
        if moved:
            self._gone.ended(session.session_id, "moved", session.owner)

    def set_epoch(self, session: Session, epoch: int) -> None:
        session.holder_epoch = epoch

    def set_replay_pending(self, session: Session, pending: bool) -> None:
        """Its journaled steps are still to be replayed (it neither expires nor evicts)."""
        session.replay_pending = pending

    def set_busy(self, session: Session, busy: bool) -> None:
        """Held by a lease (a request or generation runs on it), or free again."""
        session.busy = busy
        if busy:
            self._busy[session.session_id] = session
        else:
            self._busy.pop(session.session_id, None)

    def busy_sessions(self) -> list[Session]:
        """The sessions held by a lease now (a few: one per request running)."""
        return list(self._busy.values())

    def remove(self, session: Session, why: str) -> None:
        """End the session ("closed", "expired"): it is marked closed and forgotten, its id
        remembered so a late request learns why."""
        self.forget(session)
        self._gone.ended(session.session_id, why, session.owner)

    def ended_earlier(self, session_id: str, why: str, owner: str = "") -> None:
        """A session that ended before a restart (or on another replica), known only by its
        END record: a late request by its owner learns why (closed, expired)."""
        self._gone.ended_earlier(session_id, why, owner, live=session_id in self._sessions)

    def is_expired(self, session: Session) -> bool:
        """Idle past its TTL (a busy session never expires mid-request, nor one whose replay
        is pending)."""
        if session.busy or session.replay_pending:
            return False
        return self.clock() - session.last_used > session.ttl_seconds

    def expired(self) -> list[Session]:
        """Sessions idle past their TTL. Walks the LRU order from its oldest end and stops at
        the first session too recently used for even the shortest TTL held: every later one
        was used later still."""
        if not self._in_order:
            self._reorder()
        shortest = self._ttls.shortest()
        now = self.clock()
        found = []
        for session in self._sessions.values():
            if now - session.last_used <= shortest:
                break
            if self.is_expired(session):
                found.append(session)
        return found

    def _newest(self) -> Session:
        return self._sessions[next(reversed(self._sessions))]

    def _reorder(self) -> None:
        """Put the LRU order back in `last_used` order (after adopting out of order). The
        in-memory order is left as it is: it ranks eviction, where a restore counts as a use."""
        ordered = sorted(self._sessions.values(), key=lambda s: s.last_used)
        self._sessions = OrderedDict((s.session_id, s) for s in ordered)
        self._in_order = True

    def idle_resident(self, version: tuple[str, int] | None = None) -> Iterator[Session]:
        """In-memory sessions (of `version`, a (model, version), if given) with no request
        running, least recently used first (not copied: stop before changing the store). Busy
        sessions were touched when their request began, so they sit at the recent end and the
        first idle one comes at once."""
        resident = self._resident if version is None else self._resident_by.get(version)
        return (s for s in (resident or {}).values() if not s.busy)

    def idle_count(self) -> int:
        """In-memory sessions with no request running."""
        return len(self._resident) - sum(1 for s in self._busy.values() if s.slot is not None)

    def resident(self, version: tuple[str, int] | None = None) -> list[Session]:
        """The sessions in memory (of `version`, a (model, version), if given)."""
        resident = self._resident if version is None else self._resident_by.get(version)
        return list((resident or {}).values())

    def least_recently_used(self) -> Iterator[Session]:
        """Sessions from least to most recently used."""
        return iter(list(self._sessions.values()))

    # ---- wall time, for records that outlive this process's monotonic clock ----------------

    def last_used_wall(self, session: Session) -> float:
        return self.wall_clock() - (self.clock() - session.last_used)

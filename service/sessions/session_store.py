"""Owns the live sessions: lookup, idle TTL, the live-session cap and LRU order.

The clock is injectable so TTL behaviour is testable without sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

from service.errors import NotFound, ResourceExhausted
from service.sessions.session import Session

_REMEMBER_ENDED = 100_000  # ids remembered so a late request learns why its session is gone


class SessionStore:
    def __init__(self, max_sessions: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._ended: dict[str, str] = {}  # session id → "expired" | "closed"
        self._ended_order: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def check_capacity(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(
                f"live session limit reached ({self.max_sessions}); close sessions or retry later"
            )

    def add(self, session: Session) -> None:
        self.check_capacity()
        self._sessions[session.session_id] = session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            why = self._ended.get(session_id)
            if why == "expired":
                raise NotFound(f"session {session_id!r} expired after its idle TTL")
            if why == "closed":
                raise NotFound(f"session {session_id!r} was closed")
            raise NotFound(f"session {session_id!r} not found")
        return session

    def touch(self, session: Session) -> None:
        session.last_used = self.clock()
        self._sessions.move_to_end(session.session_id)

    def remove(self, session: Session, why: str) -> None:
        self._sessions.pop(session.session_id, None)
        self._ended[session.session_id] = why
        self._ended_order.append(session.session_id)
        if len(self._ended_order) > _REMEMBER_ENDED:
            self._ended.pop(self._ended_order.popleft(), None)

    def expired(self) -> list[Session]:
        """Idle sessions past their TTL (busy ones are never expired mid-request)."""
        now = self.clock()
        return [
            s
            for s in self._sessions.values()
            if not s.busy and now - s.last_used > s.ttl_seconds
        ]

    def least_recently_used(self) -> Iterator[Session]:
        """Sessions from least to most recently used."""
        return iter(list(self._sessions.values()))

"""What a request hears about a session this process no longer has: why it is gone.

A session that ended (closed, expired) or moved to another replica leaves its id behind, so a
late request learns why rather than NOT_FOUND; so does one whose records were refused at
start-up (damaged or lost: DATA_LOSS; intact but for other weights: FAILED_PRECONDITION). Only
its owner hears which: any other caller gets NOT_FOUND, as for an id never seen
(`security.principal`). The newest ended ids are remembered, up to a bound; refused ones until
they end (closed by their owner, or expired by the sweeper: `SessionLifecycle`), which is
when they join the ended ones. Each end is passed on (`on_end`): with the local journal, it is
kept on disk for later starts (`ended_file`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NoReturn

from service.errors import (
    SeqServeError,
    SessionClosed,
    SessionExpired,
    SessionMoved,
    SessionNotFound,
    SessionRefusal,
    SpillCorrupted,
    quote,
)
from service.security.principal import caller, may_see

REMEMBERED = 100_000  # ended ids remembered so a late request learns why its session is gone


class EndedSessions:
    def __init__(self) -> None:
        # session id → "expired" | "closed" | "moved", the newest ended last
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._owners: dict[str, str] = {}  # ended or broken session → its owner (if any)
        # session id → why its records could not be used, and the error a request gets
        self._broken: dict[str, str] = {}
        self._broken_errors: dict[str, type[SeqServeError]] = {}
        # Told of each end remembered: (session id, why, owner or "").
        self.on_end: Callable[[str, str, str], None] | None = None

    def why_gone(self, session_id: str) -> NoReturn:
        """Raise what a request for a session this process does not have hears: not found,
        closed, expired, moved, or DATA_LOSS when its records were refused at start-up;
        NOT_FOUND, whatever its state, for a caller that did not own it."""
        shown = quote(session_id)
        if caller() is not None and session_id not in self._owners:
            raise SessionNotFound(f"session {shown} not found")  # whose it was: unknown
        if not may_see(self._owners.get(session_id, "")):
            raise SessionNotFound(f"session {shown} not found")
        why = self._ended.get(session_id)
        if why == "expired":
            raise SessionExpired(f"session {shown} expired after its idle TTL")
        if why == "closed":
            raise SessionClosed(f"session {shown} was closed")
        if why == "moved":
            raise SessionMoved(f"session {shown} is held by another replica now; retry")
        broken = self._broken.get(session_id)
        if broken is not None:
            why, error = broken, self._broken_errors[session_id]
            if error is SpillCorrupted:
                raise SpillCorrupted(
                    f"session {shown} cannot be resumed: its records were refused ({why})"
                )
            raise error(f"session {shown} cannot be resumed: {why}")
        raise SessionNotFound(f"session {shown} not found")

    def ended(self, session_id: str, why: str, owner: str = "") -> None:
        """The session ended here ("closed", "expired") or moved to another replica: if it
        was refused, it is no longer (recovery read its END after refusing its record)."""
        self._forget_refusal(session_id)
        if owner:
            self._owners[session_id] = owner
        self._remember_end(session_id, why)

    def ended_earlier(self, session_id: str, why: str, owner: str = "", *, live: bool) -> None:
        """Known to have ended only by its END record (`SessionStore.ended_earlier`), or a
        refused one the sweeper expired; `live`: this process has it (only its owner is noted).
        A refused session that ended is refused no more: it answers why it ended."""
        if owner:
            self._owners[session_id] = owner
        if not live:
            self._forget_refusal(session_id)
            if self._ended.get(session_id) != why:
                self._remember_end(session_id, why)  # the tier says so: it overrides this copy's

    def mark_broken(
        self, session_id: str, why: str, error: type[SeqServeError], owner: str = ""
    ) -> None:
        self._broken[session_id] = why
        self._broken_errors[session_id] = error
        if owner:
            self._owners[session_id] = owner

    @property
    def broken(self) -> dict[str, str]:
        """Refused session → why (not a copy, so the sweeper's look each second costs nothing:
        read it, never change it)."""
        return self._broken

    def broken_owner(self, session_id: str) -> str:
        """The owner of a refused session; NOT_FOUND for a caller who may not see it."""
        owner = self._owners.get(session_id, "")
        if (caller() is not None and session_id not in self._owners) or not may_see(owner):
            raise SessionNotFound(f"session {quote(session_id)} not found")
        return owner

    def broken_error(self, session_id: str) -> type[SeqServeError]:
        """Why a refused session is refused; NOT_FOUND, as `broken_owner`, for a caller who
        may not see it."""
        self.broken_owner(session_id)
        return self._broken_errors[session_id]

    def refused_as(self, session_id: str) -> type[SeqServeError] | None:
        """The error a refused session is refused with (None: not refused), whoever asks."""
        return self._broken_errors.get(session_id)

    def refused_for_good(self, session_id: str) -> bool:
        """Whether the session is refused for what its records hold, which will not get
        better (damaged or lost: a lasting `SessionRefusal`), not for what this process lacks
        now (its version, its weights), which a later look may find otherwise."""
        error = self._broken_errors.get(session_id)
        return error is not None and issubclass(error, SessionRefusal) and error.lasting

    def close_broken(self, session_id: str) -> None:
        """A refused session was closed: remembered as closed from now on."""
        self._forget_refusal(session_id)
        self._remember_end(session_id, "closed")

    def revived(self, session_id: str) -> None:
        """The session is live (recovery rebuilt it from its journal after refusing its
        record, or a takeover read a good checkpoint of it): it is refused no more, so
        nothing that ends refused sessions (a close, the sweeper) takes it for one."""
        self._forget_refusal(session_id)

    def _forget_refusal(self, session_id: str) -> None:
        self._broken.pop(session_id, None)
        self._broken_errors.pop(session_id, None)

    def remembered(self) -> list[tuple[str, str, str]]:
        """Every ended id remembered, oldest first: (session id, why, owner or "")."""
        owners = self._owners
        return [(sid, why, owners.get(sid, "")) for sid, why in self._ended.items()]

    def _remember_end(self, session_id: str, why: str) -> None:
        self._ended[session_id] = why
        self._ended.move_to_end(session_id)  # ended again (recovery's END after the file's)
        if len(self._ended) > REMEMBERED:
            gone, _ = self._ended.popitem(last=False)
            if gone not in self._broken:  # a refused one's owner is kept: only it may close it
                self._owners.pop(gone, None)
        if self.on_end is not None:
            self.on_end(session_id, why, self._owners.get(session_id, ""))

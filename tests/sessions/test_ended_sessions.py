"""`EndedSessions`: why a session this process no longer has is gone, to its owner only."""

from __future__ import annotations

import pytest

from service.errors import SessionNotFound, VersionGone
from service.security import principal
from service.security.principal import Principal
from service.sessions import ended_sessions
from service.sessions.ended_sessions import EndedSessions


def test_a_refused_session_keeps_its_owner_when_its_end_leaves_the_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session held back for its version (recovery ends it as "lost" and refuses it) stays
    its owner's to close however many sessions end after it: when its end was pushed out of
    the ids remembered, its owner went with it, and with auth on the owner heard NOT_FOUND
    and could not close it."""
    monkeypatch.setattr(ended_sessions, "REMEMBERED", 3)
    gone = EndedSessions()
    gone.ended("s_held", "lost", owner="alice")
    gone.mark_broken("s_held", "version 2 of tok cannot be loaded", VersionGone, owner="alice")
    for k in range(5):  # five more end: the held one's end is pushed out
        gone.ended(f"s_{k}", "closed", owner="bob")
    alice = principal.current.set(Principal("alice", "client"))
    try:
        assert gone.broken_owner("s_held") == "alice"
        assert gone.broken_error("s_held") is VersionGone
    finally:
        principal.current.reset(alice)
    mallory = principal.current.set(Principal("mallory", "client"))
    try:
        with pytest.raises(SessionNotFound):
            gone.broken_owner("s_held")
    finally:
        principal.current.reset(mallory)

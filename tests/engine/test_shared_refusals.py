"""A replica that refused a damaged session of the shared tier (DATA_LOSS to its owner) lifts
that refusal once the tier no longer holds the session: its owner then hears what every other
replica says of a session whose TTL lapsed in the tier (NOT_FOUND, "expired after its idle
TTL"), anyone else the plain NOT_FOUND; on Redis and on SQLite."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.errors import DataLoss, SeqServeError, SessionClosed, SessionExpired
from service.security import principal
from service.security.principal import Principal
from service.sessions.shared_tier import Write

from .conftest import EngineFactory, toks
from .test_takeover_damage import _flip_last_byte, _rewrite_checkpoint


async def test_a_damaged_sessions_refusal_ends_once_its_ttl_lapses_in_the_tier(
    make_engine: EngineFactory, state_url: str
) -> None:
    """alice's session (TTL 1 s) has its checkpoint damaged in the tier; a second replica
    refuses it to her (DATA_LOSS). Its keys lapse in the tier, leaving nothing, not even a
    tombstone. Before, that replica answered DATA_LOSS for ever (until a restart), and kept the
    refusal in memory, while every other replica said it expired."""
    a = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    b = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    principal.current.set(Principal("alice", "client"))
    hurt, _ = await a.create_session("tok", seed=1, ttl_seconds=1.0)
    sid = hurt.session_id
    await a.feed(sid, toks(1))
    assert await a.idle_checkpoints.sweep(0.0) == 1  # its checkpoint in the tier
    _rewrite_checkpoint(state_url, sid, _flip_last_byte)
    with pytest.raises(DataLoss):
        await b.feed(sid, toks(2))
    assert sid in b.sessions.broken

    deadline = time.monotonic() + 10.0
    while sid in b.sessions.broken and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    state = b.takeover._state
    assert state is not None
    gone = state.peek(sid)
    assert (gone.epoch, gone.ended) == (0, "")  # nothing of it left in the tier

    for replica in (b, a):
        with pytest.raises(SessionExpired, match="expired after its idle TTL"):
            await replica.feed(sid, toks(3))
        with pytest.raises(SessionExpired):
            await replica.describe_session(sid)
    assert sid not in b.sessions.broken  # nothing of the refusal kept
    principal.current.set(Principal("mallory", "client"))
    with pytest.raises(SeqServeError) as stranger:
        await b.feed(sid, toks(3))
    assert stranger.value.reason == "SESSION_NOT_FOUND"
    assert "expired" not in stranger.value.message


async def test_a_damaged_sessions_refusal_ends_with_what_its_tombstone_says(
    make_engine: EngineFactory, state_url: str
) -> None:
    """The same refused session ended in the tier another way, leaving a tombstone that says
    it was closed: that replica answers its owner so, where it answered DATA_LOSS for ever.
    Meanwhile the tier is asked about it every few seconds, not at each sweep."""
    a = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    b = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    principal.current.set(Principal("alice", "client"))
    hurt, _ = await a.create_session("tok", seed=1)
    sid = hurt.session_id
    await a.feed(sid, toks(1))
    assert await a.idle_checkpoints.sweep(0.0) == 1
    _rewrite_checkpoint(state_url, sid, _flip_last_byte)
    with pytest.raises(DataLoss):
        await b.feed(sid, toks(2))
    state = b.takeover._state
    assert state is not None
    asked: list[str] = []
    epoch_of = state.epoch_of

    def counted(session_id: str) -> int:
        asked.append(session_id)
        return epoch_of(session_id)

    state.epoch_of = counted  # type: ignore[method-assign]
    await asyncio.sleep(1.0)  # some 20 sweeps
    assert asked == []  # the first look comes a few seconds after the refusal
    end = Write(sid, epoch_of(sid), 600_000, "end", [b"closed\nalice"], owner="alice")
    assert state.append([end]) == []  # its END at its epoch, as its holder writes one

    deadline = time.monotonic() + 10.0
    while sid in b.sessions.broken and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    with pytest.raises(SessionClosed, match="was closed"):
        await b.feed(sid, toks(3))
    assert 1 <= len(asked) <= 2  # one look found it gone
    principal.current.set(Principal("mallory", "client"))
    with pytest.raises(SeqServeError) as stranger:
        await b.feed(sid, toks(3))
    assert stranger.value.reason == "SESSION_NOT_FOUND"

"""A session its holder ends at its idle TTL is told "expired" on every replica, on the shared
tier (a real redis-server, and the SQLite file of `serve --workers`), as on one server. The
tier's own expiry runs one TTL after the session's last write, so it has usually dropped the
session by the time the holder's sweeper writes the end: that end must still leave its
tombstone. Before, the tier took the end for a stale holder's (no epoch to match), wrote
nothing, and every other replica answered a bare NOT_FOUND "not found"."""

from __future__ import annotations

import sqlite3
import time

import pytest
import redis

from service.errors import SessionClosed, SessionExpired
from tests.polling import until

from .conftest import EngineFactory, FakeClock, toks


def _in_tier(state_url: str, session_id: str) -> bool:
    """The tier still holds the session (on its own clock)."""
    if state_url.startswith("redis"):
        return bool(redis.Redis.from_url(state_url).exists(f"seqserve:h:{session_id}"))
    db = sqlite3.connect(state_url.removeprefix("sqlite:"))
    try:
        row = db.execute("SELECT expires FROM holders WHERE sid = ?", (session_id,)).fetchone()
    finally:
        db.close()
    return row is not None and row[0] >= time.time()


async def test_a_session_its_holder_ends_at_its_ttl_is_expired_everywhere(
    make_engine: EngineFactory, state_url: str
) -> None:
    clock = FakeClock()  # the holder's clock (its sweeper's); the tier keeps its own
    a = await make_engine(state_url=state_url, clock=clock)
    b = await make_engine(state_url=state_url)
    s, _ = await a.create_session("tok", ttl_seconds=1.0)
    await a.feed(s.session_id, toks(1))
    await until(lambda: not _in_tier(state_url, s.session_id), 30, "the tier's TTL to lapse")
    clock.advance(2)
    assert await a.sweep_expired() == 1  # a ends it: "expired", written to the tier
    with pytest.raises(SessionExpired):
        await b.feed(s.session_id, toks(2))
    with pytest.raises(SessionExpired):
        await b.describe_session(s.session_id)
    with pytest.raises(SessionExpired):
        await a.feed(s.session_id, toks(2))
    c = await make_engine(state_url=state_url)  # a replica that never saw it
    with pytest.raises(SessionExpired):
        await c.feed(s.session_id, toks(2))


async def test_a_stale_holders_ttl_end_leaves_a_close_elsewhere_as_it_was(
    make_engine: EngineFactory, state_url: str
) -> None:
    """b took the session over and closed it; a, which never heard, ends its copy at its TTL:
    the session stays "closed" everywhere, not "expired"."""
    clock = FakeClock()
    a = await make_engine(state_url=state_url, clock=clock)
    b = await make_engine(state_url=state_url)
    s, _ = await a.create_session("tok", ttl_seconds=60)
    await a.feed(s.session_id, toks(1))
    await b.feed(s.session_id, toks(2))  # taken over: a's copy is stale, a does not know
    await b.close_session(s.session_id)
    clock.advance(120)
    assert await a.sweep_expired() == 1
    c = await make_engine(state_url=state_url)
    for replica in (a, c):
        with pytest.raises(SessionClosed):
            await replica.feed(s.session_id, toks(3))

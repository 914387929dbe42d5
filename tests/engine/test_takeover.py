"""Sessions in the shared state tier — a real redis-server, and the SQLite file the workers of
`serve --workers` share — in process: two engines stand for two replicas. A session stepped
through either is one session: the other takes it over (its epoch fences the first), every
acknowledged step is there once, the next prediction and the random stream continue as if never
moved; GetSession reads without moving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from benchmarks.real_services import RedisServer
from service.engine.session_engine import SessionEngine
from service.errors import (
    FailedPrecondition,
    SessionClosed,
    SessionMoved,
    SessionNotFound,
    StateTierUnusable,
)
from service.runtime.sampler import SamplingParams

from .conftest import EngineFactory, close, crash, toks

SAMPLING = SamplingParams(temperature=1.0, max_tokens=4)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(params=["redis", "sqlite"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each shared backend: Redis (replicas), SQLite in the state directory (workers)."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"sqlite:{tmp_path / 'shared' / 'state.db'}"


async def _replicas(make_engine: EngineFactory, url: str) -> tuple[SessionEngine, SessionEngine]:
    return await make_engine(state_url=url), await make_engine(state_url=url)


async def test_a_session_moves_between_replicas_and_stays_one_session(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=3)
    ref, _ = await roomy.create_session("tok", seed=3)
    sid, rid = s.session_id, ref.session_id
    await a.feed(sid, toks(1, 2, 3))
    await roomy.feed(rid, toks(1, 2, 3))
    got = [t.token_id async for t in a.generate(sid, sampling=SAMPLING)]
    assert got == [t.token_id async for t in roomy.generate(rid, sampling=SAMPLING)]

    moved, want = await b.feed(sid, toks(4)), await roomy.feed(rid, toks(4))  # takes it over
    assert moved.position == want.position == 8 and close(moved.prediction, want.prediction)
    with pytest.raises(SessionMoved):  # a's copy is fenced: refused, nothing applied
        await a.feed(sid, toks(5))
    back, want = await a.feed(sid, toks(5)), await roomy.feed(rid, toks(5))  # the retry
    assert back.position == want.position == 9 and close(back.prediction, want.prediction)
    with pytest.raises(SessionMoved):  # b's copy is stale now: its first write is refused
        _ = [t async for t in b.generate(sid, sampling=SAMPLING)]
    got = [t.token_id async for t in b.generate(sid, sampling=SAMPLING)]  # retried: taken back
    assert got == [t.token_id async for t in roomy.generate(rid, sampling=SAMPLING)]


async def test_a_replica_killed_loses_no_acknowledged_step(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    pairs = []
    for i in range(6):
        s, _ = await a.create_session("tok", seed=i)
        r, _ = await roomy.create_session("tok", seed=i)
        for k in range(1 + i % 3):
            await a.feed(s.session_id, toks(i, k))
            await roomy.feed(r.session_id, toks(i, k))
        pairs.append((s.session_id, r.session_id))
    await crash(a)
    for sid, rid in pairs:
        got, want = await b.feed(sid, toks(9)), await roomy.feed(rid, toks(9))
        assert got.position == want.position and close(got.prediction, want.prediction), sid


async def test_a_stale_copy_never_answers_failed_precondition(
    make_engine: EngineFactory, state_url: str
) -> None:
    """b takes the session over; a (which has not written it since) is asked for the new
    position: it learns from the tier that its copy is stale and takes the session back."""
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=5)
    r, _ = await roomy.create_session("tok", seed=5)
    for engine, sid in ((a, s.session_id), (roomy, r.session_id)):
        await engine.feed(sid, toks(1), expected_position=0)
    await b.feed(s.session_id, toks(2), expected_position=1)
    await roomy.feed(r.session_id, toks(2), expected_position=1)
    got = await a.feed(s.session_id, toks(3), expected_position=2)
    want = await roomy.feed(r.session_id, toks(3), expected_position=2)
    assert got.position == want.position == 3 and close(got.prediction, want.prediction)
    with pytest.raises(FailedPrecondition):  # a real mismatch still is one
        await a.feed(s.session_id, toks(4), expected_position=7)


async def test_get_session_reads_without_moving_and_ends_are_seen_everywhere(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    s, _ = await a.create_session("tok")
    await a.feed(s.session_id, toks(1, 2))
    seen = await b.describe_session(s.session_id)
    assert seen.position == 2 and b.sessions.peek(s.session_id) is None
    assert (await a.feed(s.session_id, toks(3))).position == 3  # still a's: not fenced
    await a.close_session(s.session_id)
    with pytest.raises(SessionClosed):
        await b.feed(s.session_id, toks(4))
    with pytest.raises(SessionNotFound):
        await b.feed("s_nobody.nothing", toks(4))


async def test_a_tier_that_would_lose_sessions_stops_the_start(
    make_engine: EngineFactory, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(StateTierUnusable) as err:
            await make_engine(state_url=redis_url)
        assert "noeviction" in err.value.message
    finally:
        client.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(StateTierUnusable) as err:
        await make_engine(state_url="redis://127.0.0.1:1/0")
    assert "unreachable" in err.value.message

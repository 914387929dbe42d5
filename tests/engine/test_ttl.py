"""Idle TTL on a controllable clock: expired sessions are gone, and say so."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import InvalidArgument, NotFound, SessionExpired
from service.registry.store import ModelStore

from .conftest import FRAMES, EngineFactory, FakeClock, RecordingObserver, publish, toks


async def test_idle_session_expires_after_its_ttl(make_engine: EngineFactory) -> None:
    clock = FakeClock()
    engine = await make_engine(clock=clock, ttl_seconds=60.0)
    session, _ = await engine.create_session("tok")
    clock.advance(59.0)
    await engine.feed(session.session_id, toks(1))  # a use resets the idle clock
    clock.advance(59.0)
    assert engine.get_session(session.session_id).position == 1
    clock.advance(2.0)
    with pytest.raises(SessionExpired, match="expired") as err:
        await engine.feed(session.session_id, toks(2))
    assert isinstance(err.value, NotFound)
    with pytest.raises(SessionExpired, match="expired"):  # and stays gone, saying why
        engine.get_session(session.session_id)
    with pytest.raises(SessionExpired):
        await engine.close_session(session.session_id)


async def test_ttl_is_per_session_within_the_maximum(make_engine: EngineFactory) -> None:
    clock = FakeClock()
    engine = await make_engine(clock=clock, ttl_seconds=100.0, max_ttl_seconds=1000.0)
    short, _ = await engine.create_session("tok", ttl_seconds=5.0)
    default, _ = await engine.create_session("tok")
    long, _ = await engine.create_session("tok", ttl_seconds=1000.0)
    assert (short.ttl_seconds, default.ttl_seconds, long.ttl_seconds) == (5.0, 100.0, 1000.0)
    with pytest.raises(InvalidArgument, match="ttl"):
        await engine.create_session("tok", ttl_seconds=1000.5)
    with pytest.raises(InvalidArgument, match="ttl"):
        await engine.create_session("tok", ttl_seconds=-1.0)
    clock.advance(50.0)
    assert await engine.sweep_expired() == 1
    with pytest.raises(SessionExpired):
        engine.get_session(short.session_id)
    clock.advance(60.0)
    assert await engine.sweep_expired() == 1
    assert engine.get_session(long.session_id).session_id == long.session_id
    with pytest.raises(SessionExpired):
        engine.get_session(default.session_id)


async def test_expired_spilled_session_frees_its_record_and_its_version(
    make_engine: EngineFactory,
) -> None:
    clock = FakeClock()
    observer = RecordingObserver()
    engine = await make_engine(clock=clock, slots=1, ttl_seconds=10.0, observer=observer)
    old, _ = await engine.create_session("tok", "1")
    clock.advance(5.0)
    await engine.create_session("tok", "1")  # evicts `old`
    assert old.slot is None and old.session_id in engine.spill
    clock.advance(6.0)
    assert await engine.sweep_expired() == 1
    assert old.session_id not in engine.spill and engine.stats().spilled_bytes == 0
    assert observer.count("expired") == 1
    assert engine.versions.pinned("tok", 1) == 1


async def test_version_unloads_when_its_last_session_expires(
    make_engine: EngineFactory, store_root: Path
) -> None:
    clock = FakeClock()
    engine = await make_engine(clock=clock, ttl_seconds=10.0)
    await engine.create_session("frames")
    # Move `frames` on to a new version: the old one is kept only for its session.
    publish(ModelStore(store_root), "frames", FRAMES, seed=9)
    await engine.settle()
    assert engine.versions.find("frames", 1) is not None
    clock.advance(11.0)
    await engine.sweep_expired()
    await engine.settle()
    assert engine.versions.find("frames", 1) is None

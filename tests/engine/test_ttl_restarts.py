"""The time the server was down after a clean stop never counts toward a TTL, however many
restarts a session sits through unused in the spill tier (its checkpoint keeps its last use
from before them all), refused sessions included; a crash's downtime counts (README,
Restarts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SessionExpired, VersionGone

from .conftest import EngineFactory, FakeClock, crash, frames, toks

OPTS = {"checkpoint_idle_seconds": 3600.0, "ttl_seconds": 60.0}


async def test_no_clean_stops_downtime_counts_after_many_restarts(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Idle 10 s, then three clean stops of 100 s with 5 s up between: 20 s idle in all."""
    spill = tmp_path / "state"
    clock = FakeClock()
    engine = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    s, _ = await engine.create_session("frames")
    await engine.feed(s.session_id, frames(1.0, 2.0, 3.0))
    clock.advance(10.0)
    for _ in range(3):
        await engine.stop()
        clock.advance(100.0)
        engine = await make_engine(spill_dir=spill, clock=clock, **OPTS)
        clock.advance(5.0)
    got = engine.get_session(s.session_id)
    assert engine.sessions.clock() - got.last_used == pytest.approx(25.0)
    clock.advance(35.0)  # 60 s of uptime: not past its TTL yet
    assert (await engine.feed(s.session_id, frames(1.0, 1.0, 1.0))).position == 2
    clock.advance(61.0)
    with pytest.raises(SessionExpired):
        engine.get_session(s.session_id)


async def test_after_a_crash_only_its_own_downtime_counts(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Idle 10 s, a clean stop of 100 s, 5 s up, a crash of 30 s: 45 s idle, not 145 s."""
    spill = tmp_path / "state"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    s, _ = await first.create_session("frames")
    await first.feed(s.session_id, frames(1.0, 2.0, 3.0))
    clock.advance(10.0)
    await first.stop()
    clock.advance(100.0)
    second = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    clock.advance(5.0)
    await crash(second)
    clock.advance(30.0)

    third = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    got = third.get_session(s.session_id)
    assert third.sessions.clock() - got.last_used == pytest.approx(45.0)
    clock.advance(16.0)
    with pytest.raises(SessionExpired):
        third.get_session(s.session_id)


async def test_a_refused_sessions_ttl_skips_a_clean_stops_downtime(
    make_engine: EngineFactory, store_root: Path, tmp_path: Path
) -> None:
    """Held (its version missing) across a clean stop of 1,000 s: the sweeper ends it once
    its TTL has passed in time the server was up, not at the first sweep after the start."""
    spill = tmp_path / "state"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock, **{**OPTS, "slots": 1})
    held, _ = await first.create_session("tok")
    await first.feed(held.session_id, toks(1, 2))
    await first.create_session("tok", ttl_seconds=3600.0)  # evicts `held`: checkpoint at 2
    clock.advance(10.0)
    await first.feed(held.session_id, toks(3))  # journaled only, after the checkpoint
    await crash(first)
    (store_root / "tok" / "1").rename(tmp_path / "tok-1-away")
    checkpoint = spill / f"{held.session_id}.spill"

    second = await make_engine(spill_dir=spill, clock=clock, **{**OPTS, "slots": 1})
    assert await second.sweep_expired() == 0
    clock.advance(10.0)  # 20 s since the checkpoint's last use
    await second.stop()
    clock.advance(1000.0)

    third = await make_engine(spill_dir=spill, clock=clock, **{**OPTS, "slots": 1})
    with pytest.raises(VersionGone):
        third.get_session(held.session_id)
    clock.advance(1.0)
    assert await third.sweep_expired() == 0
    assert checkpoint.exists()
    clock.advance(40.0)  # 61 s of uptime since the checkpoint's last use
    assert await third.sweep_expired() == 1
    assert not checkpoint.exists()
    with pytest.raises(SessionExpired):
        third.get_session(held.session_id)

"""Background sweeps share the event loop with requests: they run in slices, and what a
request did to a session while a sweep breathed is respected when the sweep comes back to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from service.engine import idle_checkpoints
from service.engine.background import Slices
from service.engine.idle_checkpoints import CHECKPOINT_BATCH
from service.engine.session_engine import SessionEngine
from service.errors import SpillTierFull
from service.runtime.sampler import SessionRng

from .conftest import EngineFactory, FakeClock, toks

N = 12


class Meddling(Slices):
    """Yields before every item; at breath `at`, runs `act` (a request arriving mid-sweep)."""

    def __init__(self, at: int, act: Callable[[], Awaitable[object]]) -> None:
        super().__init__(seconds=0.0)
        self._at, self._act = at, act

    async def breathe(self) -> None:
        await super().breathe()
        if self.breaths == self._at:
            await self._act()


async def _idle_sessions(make_engine: EngineFactory) -> tuple[SessionEngine, FakeClock, list[str]]:
    """An engine on a fake clock with N sessions fed once (journaled: each needs a checkpoint)
    and idle for 10 s since."""
    clock = FakeClock()
    engine = await make_engine(clock=clock)
    ids = []
    for i in range(N):
        session, _ = await engine.create_session("tok", seed=i, ttl_seconds=60.0)
        await engine.feed(session.session_id, toks(i + 1))
        ids.append(session.session_id)
    clock.advance(10.0)
    return engine, clock, ids


async def _ticks_while(work: Awaitable[int]) -> tuple[int, int]:
    """(what `work` returned, how many loop ticks another task got while it ran)."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    ticks = 0
    try:
        result = await work
    finally:
        done = True
        await task
    return result, ticks


async def test_slices_yield_only_once_their_time_is_up() -> None:
    eager, patient = Slices(seconds=0.0), Slices(seconds=3600.0)
    for _ in range(5):
        await eager.breathe()
        await patient.breathe()
    assert (eager.breaths, patient.breaths) == (5, 0)


async def test_idle_checkpoints_let_requests_run_between_sessions(
    make_engine: EngineFactory,
) -> None:
    engine, _, ids = await _idle_sessions(make_engine)
    written, ticks = await _ticks_while(engine.idle_checkpoints.sweep(5.0, Slices(seconds=0.0)))
    assert written == N
    assert ticks >= -(-N // CHECKPOINT_BATCH)  # other work ran before each batch of writes
    assert all(engine.sessions.record_is_current(engine.get_session(i)) for i in ids)


async def test_idle_checkpoints_keep_each_session_s_state_and_random_stream(
    make_engine: EngineFactory,
) -> None:
    """The sweep reads a batch's states together (`StatePool.snapshots`) and writes a stream not
    drawn from since its seed as a seed and a count: each record still holds its own session's
    state and stream, and a stream read back from it is built only if it had been."""
    engine, _, ids = await _idle_sessions(make_engine)
    assert N > CHECKPOINT_BATCH  # batches of eight and of the rest
    drew = engine.get_session(ids[3])
    drew.rng.uniform()  # a generation drew from this one: its generator is built
    pool = engine.versions.find("tok", 1).pool  # type: ignore[union-attr]
    live = {i: pool.snapshot(engine.get_session(i).slot) for i in ids}  # type: ignore[arg-type]
    twins = {i: engine.get_session(i).rng.copy() for i in ids}
    assert await engine.idle_checkpoints.sweep(5.0, Slices(seconds=0.0)) == N
    for i in ids:
        record = engine.residency.tier.read(i)  # checked and validated as on a restore
        assert record.header.session_id == i
        np.testing.assert_array_equal(record.state.h, live[i].h)
        np.testing.assert_array_equal(record.state.c, live[i].c)  # type: ignore[arg-type]
        read_back = SessionRng.from_state(record.header.rng_state)
        assert read_back.built == (i == ids[3])
        assert [read_back.uniform() for _ in range(3)] == [twins[i].uniform() for _ in range(3)]


async def test_a_session_used_or_closed_mid_sweep_is_not_checkpointed_as_it_was(
    make_engine: EngineFactory,
) -> None:
    engine, _, ids = await _idle_sessions(make_engine)
    used, closed = ids[-1], ids[-2]  # the sweep comes to them in its second batch
    assert N > CHECKPOINT_BATCH >= 2

    async def requests() -> None:
        await engine.feed(used, toks(9))
        await engine.close_session(closed)

    written = await engine.idle_checkpoints.sweep(5.0, Meddling(2, requests))
    assert written == N - 2
    assert not engine.sessions.record_is_current(engine.get_session(used))  # still journaled
    assert engine.get_session(used).position == 2
    assert closed not in engine.spill  # no checkpoint brought the closed one's record back
    assert all(engine.sessions.record_is_current(engine.get_session(i)) for i in ids[:-2])


async def test_expiry_lets_requests_run_between_sessions(make_engine: EngineFactory) -> None:
    engine, clock, ids = await _idle_sessions(make_engine)
    fresh, _ = await engine.create_session("tok", ttl_seconds=600.0)
    clock.advance(60.0)  # past the TTL of all but `fresh`
    ended, ticks = await _ticks_while(engine.lifecycle.sweep_expired(Slices(seconds=0.0)))
    assert ended == N and ticks >= N
    assert [s.session_id for s in engine.sessions] == [fresh.session_id]
    assert engine.versions.pinned("tok", 1) == 1  # each ended once: unpinned once
    assert not any(i in engine.spill for i in ids)


async def test_a_sweep_with_nothing_due_still_lets_requests_run_while_it_looks(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _, ids = await _idle_sessions(make_engine)
    monkeypatch.setattr(idle_checkpoints, "SCAN_STRIDE", 4)
    written, ticks = await _ticks_while(engine.idle_checkpoints.sweep(60.0, Slices(0.0)))
    assert written == 0  # idle 10 s, none for 60
    assert ticks >= N // 4  # other work ran after every 4 sessions looked at
    assert all(engine.sessions.is_unsaved(engine.get_session(i)) for i in ids)


async def test_checkpoints_are_counted_and_timed_as_the_tier_takes_them(
    make_engine: EngineFactory,
) -> None:
    """`CheckpointWriter.writes` / `write_seconds` (exported as seqserve_state_write*): each record
    the tier took, with the wall time it took; a write the disk refused counts in neither."""
    engine, _, _ = await _idle_sessions(make_engine)
    tier = engine.residency.tier
    real_write = tier.write
    refusals = [1]  # the first write: the disk is full (the sweep stops, the next one retries)

    def slow_write(record, **kw):  # type: ignore[no-untyped-def]
        if refusals[0]:
            refusals[0] -= 1
            raise SpillTierFull("spill tier's disk is full")
        time.sleep(0.002)  # a disk that charges 2 ms a record
        real_write(record, **kw)

    tier.write = slow_write  # type: ignore[method-assign]
    try:
        assert await engine.idle_checkpoints.sweep(5.0, Slices(seconds=0.0)) == 0
        assert engine.stats().state_writes == 0 and engine.stats().state_write_seconds == 0
        assert await engine.idle_checkpoints.sweep(5.0, Slices(seconds=0.0)) == N
    finally:
        tier.write = real_write  # type: ignore[method-assign]
    stats = engine.stats()
    assert stats.state_writes == N
    assert 0.002 * N <= stats.state_write_seconds < 5.0

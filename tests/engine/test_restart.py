"""Stop writes every session to the spill tier; an engine started on the same directory resumes
each at the same position with the same next prediction and the same random stream."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from service.engine import shutdown_write
from service.engine.session_residency import SessionResidency
from service.errors import SessionExpired, SpillTierInUse, Unavailable
from service.runtime.sampler import SamplingParams
from service.sessions.spill_tier import SpillTier
from tests.polling import until

from .conftest import EngineFactory, FakeClock, RecordingObserver, frames, same, toks


@pytest.mark.parametrize("spill_batch", [2, shutdown_write.SPILL_BATCH])
async def test_sessions_survive_a_restart(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spill_batch: int
) -> None:
    """(`spill_batch`: the sessions whose states the stop reads together; at 2 the sessions of
    the two models in memory come in more than one batch.)"""
    monkeypatch.setattr(shutdown_write, "SPILL_BATCH", spill_batch)
    spill = tmp_path / "shared-spill"
    first = await make_engine(slots=3, spill_dir=spill)
    roomy = await make_engine()
    pairs = []
    for i in range(7):  # more than the pool: some are already spilled when it stops
        a, _ = await first.create_session("tok", seed=i, ttl_seconds=3600.0)
        b, _ = await roomy.create_session("tok", seed=i)
        chunk = toks(*range(i + 1, i + 3 + i % 2))
        await first.feed(a.session_id, chunk)
        await roomy.feed(b.session_id, chunk)
        warmup = SamplingParams(temperature=1.0, max_tokens=3)  # moves the RNG off its seed
        got_ids = [t.token_id async for t in first.generate(a.session_id, sampling=warmup)]
        assert got_ids == [t.token_id async for t in roomy.generate(b.session_id, sampling=warmup)]
        pairs.append((a.session_id, b.session_id))
    frame_s, _ = await first.create_session("frames", seed=5)
    frames_ref, _ = await roomy.create_session("frames", seed=5)
    for engine, sid in ((first, frame_s.session_id), (roomy, frames_ref.session_id)):
        await engine.feed(sid, frames(0.25, 0.5, -1.0, 2.0, 0.0, 1.0))
    fork = await first.fork_session(pairs[0][0])
    positions = {s.session_id: s.position for s in first.sessions}
    await first.stop()
    assert len(list(spill.glob("*.spill"))) == len(positions)

    observer = RecordingObserver()
    second = await make_engine(slots=3, spill_dir=spill, observer=observer)
    assert {s.session_id: s.position for s in second.sessions} == positions
    assert all(s.slot is None for s in second.sessions)
    assert second.get_session(fork.session_id).parent_session_id == pairs[0][0]
    assert second.get_session(pairs[2][0]).ttl_seconds == 3600.0
    assert second.versions.pinned("tok", 1) == 8
    for a, b in pairs:
        got, want = await second.feed(a, toks(42)), await roomy.feed(b, toks(42))
        assert got.position == want.position and same(got.prediction, want.prediction)
    got = await second.feed(frame_s.session_id, frames(1.0, 1.0, 1.0))
    want = await roomy.feed(frames_ref.session_id, frames(1.0, 1.0, 1.0))
    assert got.prediction.values == want.prediction.values
    sampling = SamplingParams(temperature=0.8, max_tokens=5)
    for a, b in pairs:  # the RNG went through the restart too
        got_ids = [t.token_id async for t in second.generate(a, sampling=sampling)]
        want_ids = [t.token_id async for t in roomy.generate(b, sampling=sampling)]
        assert got_ids == want_ids
    assert observer.count("restored") >= len(pairs)


async def test_idle_time_runs_on_across_a_restart_but_not_while_down(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "shared-spill"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock)
    short, _ = await first.create_session("tok", ttl_seconds=60.0)
    long, _ = await first.create_session("tok", ttl_seconds=600.0)
    clock.advance(40.0)
    await first.stop()
    clock.advance(3600.0)  # down for an hour: nobody could use the sessions meanwhile
    second = await make_engine(spill_dir=spill, clock=clock)
    clock.advance(15.0)  # 55 s idle in all while up
    assert second.get_session(short.session_id).position == 0
    clock.advance(6.0)
    with pytest.raises(SessionExpired):
        await second.feed(short.session_id, toks(1))
    # A lookup never ends a session: the record stays until the sweeper ends it.
    assert (spill / f"{short.session_id}.spill").exists()
    assert await second.sweep_expired() == 1
    assert not (spill / f"{short.session_id}.spill").exists()
    assert (await second.feed(long.session_id, toks(1))).position == 1


async def test_after_a_crash_the_downtime_counts(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """No clean-stop marker (a crash after the records were written): the stop time is
    unknown, so the idle clock is taken to have run all along."""
    spill = tmp_path / "shared-spill"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock)
    short, _ = await first.create_session("tok", ttl_seconds=60.0)
    long, _ = await first.create_session("tok", ttl_seconds=600.0)
    clock.advance(40.0)
    await first.stop()
    (spill / ".stopped_at").unlink()
    clock.advance(30.0)
    second = await make_engine(spill_dir=spill, clock=clock)
    with pytest.raises(SessionExpired):
        second.get_session(short.session_id)
    assert second.get_session(long.session_id).position == 0


async def test_a_close_while_the_shutdown_writes_is_refused_and_the_session_kept(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shutdown writes the sessions in memory on a thread of its own while the loop still
    answers; a close arriving then would free a slot or delete a record under that write. It
    gets UNAVAILABLE, and the session is written and resumes after the restart."""
    spill = tmp_path / "shared-spill"
    first = await make_engine(spill_dir=spill)
    ids = []
    for i in range(3):
        session, _ = await first.create_session("tok", seed=i)
        await first.feed(session.session_id, toks(i + 1))
        ids.append(session.session_id)
    writing, go = threading.Event(), threading.Event()
    spill_all = shutdown_write.spill_all

    def gated(residency: SessionResidency, stop: threading.Event | None = None) -> tuple[int, int]:
        writing.set()
        go.wait(10)
        return spill_all(residency, stop)

    monkeypatch.setattr(shutdown_write, "spill_all", gated)
    stopping = asyncio.ensure_future(first.stop())
    await until(writing.is_set, 60, "the stop's spill to begin")  # a loaded host: seconds
    try:
        with pytest.raises(Unavailable, match="shutting down"):
            await first.close_session(ids[1])
    finally:
        go.set()
        await stopping
    assert first.get_session(ids[1]).closed is False
    second = await make_engine(spill_dir=spill)
    assert sorted(s.session_id for s in second.sessions) == sorted(ids)
    assert (await second.feed(ids[1], toks(9))).position == 2


async def test_one_server_per_spill_directory(make_engine: EngineFactory, tmp_path: Path) -> None:
    await make_engine(spill_dir=tmp_path / "shared-spill")
    with pytest.raises(SpillTierInUse):
        await make_engine(spill_dir=tmp_path / "shared-spill")


async def test_stop_writes_only_sessions_changed_since_their_checkpoint(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle checkpoints already hold most sessions: stopping writes only those used since (a
    step, or only a retry that touched the idle clock), and the restart resumes every one at
    its position, prediction and idle clock."""
    spill = tmp_path / "shared-spill"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock)
    roomy = await make_engine()
    pairs = []
    for i in range(4):
        a, _ = await first.create_session("tok", seed=i, ttl_seconds=100.0)
        b, _ = await roomy.create_session("tok", seed=i)
        await first.feed(a.session_id, toks(i + 1, i + 2), request_id=f"r{i}", expected_position=0)
        await roomy.feed(b.session_id, toks(i + 1, i + 2))
        pairs.append((a.session_id, b.session_id))
    clock.advance(10.0)
    await first.idle_checkpoints.sweep(5.0)  # (the sweeper may have written some already)
    assert all(first.sessions.record_is_current(s) for s in first.sessions)
    clock.advance(10.0)
    retried = await first.feed(pairs[1][0], toks(2, 3), request_id="r1", expected_position=0)
    assert retried.position == 2  # a retry: it applied nothing, only its use was new
    clock.advance(1.0)
    await first.feed(pairs[0][0], toks(7))
    await roomy.feed(pairs[0][1], toks(7))
    tier, written = first.residency.tier, []
    write = tier.write

    def counted(record: object, **kwargs: object) -> None:
        written.append(record.header.session_id)  # type: ignore[attr-defined]
        write(record, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tier, "write", counted)
    await first.stop()
    assert sorted(written) == sorted([pairs[0][0], pairs[1][0]])

    second = await make_engine(spill_dir=spill, clock=clock)
    clock.advance(85.0)  # idle since: 106 s for the untouched, 85 s and 86 s for the others
    for untouched in (pairs[2][0], pairs[3][0]):
        with pytest.raises(SessionExpired):
            second.get_session(untouched)
    for a, b in pairs[:2]:
        got, want = await second.feed(a, toks(42)), await roomy.feed(b, toks(42))
        assert got.position == want.position and same(got.prediction, want.prediction)


async def test_a_failed_flush_at_stop_keeps_the_journal(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoints written at stop could not be flushed (an I/O error from fsync): they may
    not be on disk, so the journal that holds the same steps is kept, not trimmed."""
    spill = tmp_path / "shared-spill"

    def journal_bytes() -> int:
        return sum(p.stat().st_size for p in (spill / "journal").iterdir())

    for fails in (False, True):
        engine = await make_engine(spill_dir=spill)
        made, _ = await engine.create_session("tok")
        await engine.feed(made.session_id, toks(1, 2, 3))
        if fails:

            def broken_sync() -> None:
                raise OSError(5, "Input/output error")

            monkeypatch.setattr(engine.spill, "sync", broken_sync)
        before = journal_bytes()
        await engine.stop()
        if fails:
            assert journal_bytes() >= before > 0
        else:
            assert journal_bytes() < before  # a clean stop trims it


async def test_a_shutdown_writes_every_session_in_memory_past_the_spill_cap(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Without a journal the shutdown's write is all a session in memory has: a spill tier at
    its cap refused it, and the session was lost with the process (NOT_FOUND after the
    restart). The write goes past the cap (by at most what the pool holds)."""
    spill = tmp_path / "capped"
    first = await make_engine(slots=4, spill_dir=spill, durability="shutdown")
    positions = {}
    for i in range(7):  # three spilled, four in memory
        made, _ = await first.create_session("tok", seed=i)
        positions[made.session_id] = (await first.feed(made.session_id, toks(i + 1, 2))).position
    tier = first.residency.tier
    assert isinstance(tier, SpillTier)
    tier.max_bytes = tier.bytes_used  # full: not one more record fits
    await first.stop()
    assert len(list(spill.glob("*.spill"))) == 7

    second = await make_engine(slots=4, spill_dir=spill, durability="shutdown")
    for session_id, position in positions.items():
        assert (await second.feed(session_id, toks(9))).position == position + 1

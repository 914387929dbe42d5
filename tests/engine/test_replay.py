"""Journal replay after a restart runs while the server serves: sessions are at their final
positions from the start, a request replays its own session first, the rest replay in the
background; a crash, a close, expiry or a shutdown in the middle of it loses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.replay import PendingReplays
from service.engine.session_engine import SessionEngine
from service.errors import DataLoss, ResourceExhausted, SessionClosed
from service.runtime.sampler import SamplingParams

from .conftest import EngineFactory, FakeClock, close, crash, toks

SAMPLING = SamplingParams(temperature=1.0, max_tokens=4)
N = 12


async def _fed_pairs(first: SessionEngine, roomy: SessionEngine) -> list[tuple[str, str]]:
    """N sessions on `first` and their twins on `roomy`, fed and sampled alike."""
    pairs = []
    for i in range(N):
        a, _ = await first.create_session("tok", seed=i)
        b, _ = await roomy.create_session("tok", seed=i)
        for k in range(3):
            chunk = toks(*[(i * 7 + k * 3 + j) % 256 for j in range(1 + (i + k) % 4)])
            assert (await first.feed(a.session_id, chunk)).position == (
                await roomy.feed(b.session_id, chunk)
            ).position
        if i % 3 == 0:
            got = [t.token_id async for t in first.generate(a.session_id, sampling=SAMPLING)]
            want = [t.token_id async for t in roomy.generate(b.session_id, sampling=SAMPLING)]
            assert got == want
        pairs.append((a.session_id, b.session_id))
    return pairs


async def _crashed(
    make_engine: EngineFactory, tmp_path: Path
) -> tuple[Path, SessionEngine, list[tuple[str, str]]]:
    """A state directory whose engine was killed with N fed sessions in its journal only;
    their uninterrupted twins; the (session, twin) ids."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    roomy = await make_engine(durability="shutdown")
    pairs = await _fed_pairs(first, roomy)
    await crash(first)
    return spill, roomy, pairs


async def _same(engine: SessionEngine, roomy: SessionEngine, a: str, b: str, token: int) -> None:
    """The next step and the next samples agree with the uninterrupted twin."""
    got, want = await engine.feed(a, toks(token)), await roomy.feed(b, toks(token))
    assert got.position == want.position
    assert close(got.prediction, want.prediction), a
    got_t = [t.token_id async for t in engine.generate(a, sampling=SAMPLING)]
    assert got_t == [t.token_id async for t in roomy.generate(b, sampling=SAMPLING)]


async def test_requests_replay_their_session_first_the_rest_replay_in_the_background(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill, roomy, pairs = await _crashed(make_engine, tmp_path)

    second = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    replays = second.leases.replays
    assert len(replays) == N and second.stats().sessions_replaying == N  # nothing computed yet
    for a, b in pairs:  # positions are final before any replay
        assert second.get_session(a).position == roomy.get_session(b).position
    a, b = pairs[5]
    await _same(second, roomy, a, b, 42)  # replayed on demand, ahead of the background
    await replays.wait()
    assert len(replays) == 0 and second.stats().sessions_replaying == 0
    assert replays.replayed_sessions == N
    for k, (a, b) in enumerate(pairs):
        if k != 5:
            assert second.get_session(a).slot is None  # replayed to a checkpoint, not memory
            await _same(second, roomy, a, b, 7)


async def test_a_crash_before_the_background_replay_ends_loses_nothing(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill, roomy, pairs = await _crashed(make_engine, tmp_path)

    # The background replay gets to no session: each is replayed when a request needs it.
    monkeypatch.setattr(PendingReplays, "_next_batch", lambda self: [])
    second = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    a, b = pairs[0]
    await _same(second, roomy, a, b, 11)  # replayed, stepped and journaled anew
    assert len(second.leases.replays) == N - 1
    await crash(second)  # the others never replayed: their journal segments must still be there

    third = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    for a, b in pairs:
        await _same(third, roomy, a, b, 3)


async def test_shutdown_keeps_the_journal_of_sessions_not_yet_replayed(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill, roomy, pairs = await _crashed(make_engine, tmp_path)

    second = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    await second.stop()  # at once: the background replay had no turn
    third = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    for a, b in pairs:
        await _same(third, roomy, a, b, 5)


async def test_close_and_expiry_of_sessions_whose_replay_is_pending(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill, _roomy, pairs = await _crashed(make_engine, tmp_path)

    clock = FakeClock()
    monkeypatch.setattr(PendingReplays, "_next_batch", lambda self: [])  # no background yet
    second = await make_engine(spill_dir=spill, checkpoint_steps=1000, clock=clock)
    closed = pairs[1][0]
    await second.close_session(closed)  # waits for its replay, then ends it
    clock.advance(10 * 3600.0)  # past every TTL: but a session whose replay is pending stays
    pending = len(second.leases.replays)
    assert pending == N - 1 and await second.lifecycle.sweep_expired() == 0
    monkeypatch.undo()
    second.leases.replays.start()  # now the background replays them
    await second.leases.replays.wait()
    assert await second.lifecycle.sweep_expired() == N - 1  # replayed: its idle clock runs again
    await crash(second)

    third = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    with pytest.raises(SessionClosed):
        third.get_session(closed)
    assert len(third.sessions) == 0


async def test_a_session_lost_in_its_replay_answers_data_loss_and_unpins_once(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Its checkpoint was damaged, and the journal does not hold its whole history (a fork's
    child: its first checkpoint is all of it): the request that starts its replay (a close
    here) gets DATA_LOSS, and the version other sessions still use stays pinned by them."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    parent, _ = await first.create_session("tok", seed=1)
    t, _ = await first.create_session("tok", seed=2)
    await first.feed(parent.session_id, toks(1, 2))
    s = await first.fork_session(parent.session_id)
    await first.feed(s.session_id, toks(3))
    await crash(first)
    (record,) = spill.glob(f"{s.session_id}*")
    data = bytearray(record.read_bytes())
    data[-3] ^= 0xFF  # inside the state: the checksum fails
    record.write_bytes(bytes(data))

    second = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    with pytest.raises(DataLoss):
        await second.close_session(s.session_id)
    with pytest.raises(DataLoss):
        await second.feed(s.session_id, toks(4))
    assert second.versions.pinned("tok", 1) == 2  # the parent's and t's
    await second.close_session(t.session_id)
    await second.close_session(parent.session_id)
    assert second.versions.pinned("tok", 1) == 0


async def test_sessions_replayed_after_a_crash_with_the_spill_tier_near_its_cap_are_served(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """A full pool, the spill tier near its cap (one more eviction refused), then a crash: the
    sessions that were in memory come back from the journal alone, and their replay writes
    their checkpoints to the tier. Those writes may pass the cap, as a shutdown's do: the
    sessions existed before, and the pool they held bounds how far past it that goes. Before,
    each replay was refused as "spill tier full": every request for them RESOURCE_EXHAUSTED,
    the background replay retrying forever."""
    probe = await make_engine(slots=1)  # one record's size on disk
    await probe.create_session("tok", seed=0)
    await probe.create_session("tok", seed=1)  # evicts the first
    record = probe.spill.bytes_used
    assert record > 0

    spill, slots = tmp_path / "state", 3
    settings = {"slots": slots, "spill_max_bytes": record * 3 // 2, "checkpoint_steps": 1000}
    first = await make_engine(spill_dir=spill, slot_wait_seconds=0, **settings)
    roomy = await make_engine(durability="shutdown")
    pairs = []
    for i in range(slots + 1):  # the first is evicted: the tier holds one record
        a, _ = await first.create_session("tok", seed=i)
        b, _ = await roomy.create_session("tok", seed=i)
        pairs.append((a.session_id, b.session_id))
    with pytest.raises(ResourceExhausted):  # a second eviction would pass the cap
        await first.create_session("tok", seed=99)
    in_memory = [(a, b) for a, b in pairs if first.get_session(a).slot is not None]
    assert len(in_memory) == slots and len(first.spill) == 1
    for k, (a, b) in enumerate(in_memory):
        chunk = toks(*range(k + 1, k + 4))
        await first.feed(a, chunk)
        await roomy.feed(b, chunk)
    await crash(first)

    second = await make_engine(spill_dir=spill, slot_wait_seconds=0, **settings)
    assert second.leases.replays.replaying == slots  # the evicted one: only checked
    a, b = in_memory[0]
    await _same(second, roomy, a, b, 5)  # replayed on demand, its checkpoint past the cap
    await second.leases.replays.wait()  # the rest in the background
    assert len(second.leases.replays) == 0
    for a, b in in_memory:
        await _same(second, roomy, a, b, 9)

"""ForkSession copies state, position and RNG; the two then diverge independently."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from service.errors import Internal, SessionLimit
from service.runtime.sampler import SamplingParams
from service.sessions import spill_tier

from .conftest import EngineFactory, RecordingObserver, close, same, toks

SAMPLING = SamplingParams(temperature=1.0, max_tokens=8)


async def test_fork_copies_then_diverges(make_engine: EngineFactory) -> None:
    observer = RecordingObserver()
    engine = await make_engine(observer=observer)
    parent, _ = await engine.create_session("tok", seed=3)
    await engine.feed(parent.session_id, toks(10, 20, 30))
    child = await engine.fork_session(parent.session_id)
    assert (child.position, child.parent_session_id, child.seed) == (3, parent.session_id, 3)
    assert child.slot != parent.slot
    assert observer.count("forked") == 1

    # Same state, same RNG: the same next prediction and the same sampled continuation.
    p_gen = [t.token_id async for t in engine.generate(parent.session_id, sampling=SAMPLING)]
    c_gen = [t.token_id async for t in engine.generate(child.session_id, sampling=SAMPLING)]
    assert p_gen == c_gen

    # Different inputs now: the states part ways, and feeding one leaves the other alone.
    twin, _ = await engine.create_session("tok", seed=3)  # replays the parent's history
    await engine.feed(twin.session_id, toks(10, 20, 30, *p_gen))
    c_next = await engine.feed(child.session_id, toks(99))
    p_next = await engine.feed(parent.session_id, toks(1))
    t_next = await engine.feed(twin.session_id, toks(1))
    assert close(p_next.prediction, t_next.prediction)
    assert not close(c_next.prediction, p_next.prediction)
    assert (parent.position, child.position) == (12, 12)


async def test_fork_with_a_seed_has_its_own_random_stream(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    parent, _ = await engine.create_session("tok", seed=3)
    await engine.feed(parent.session_id, toks(65, 66))
    child = await engine.fork_session(parent.session_id, seed=4)
    assert child.seed == 4
    long = SamplingParams(temperature=2.0, max_tokens=24)
    p_gen = [t.token_id async for t in engine.generate(parent.session_id, sampling=long)]
    c_gen = [t.token_id async for t in engine.generate(child.session_id, sampling=long)]
    assert p_gen != c_gen


async def test_fork_of_a_spilled_session(make_engine: EngineFactory) -> None:
    engine = await make_engine(slots=2)
    roomy = await make_engine()
    parent, _ = await engine.create_session("tok", seed=8)
    ref, _ = await roomy.create_session("tok", seed=8)
    await engine.feed(parent.session_id, toks(7, 7))
    await roomy.feed(ref.session_id, toks(7, 7))
    await engine.create_session("tok")
    await engine.create_session("tok")  # `parent` is evicted now
    assert parent.slot is None
    child = await engine.fork_session(parent.session_id)
    got = await engine.feed(child.session_id, toks(3))
    want = await roomy.feed(ref.session_id, toks(3))
    assert got.position == want.position == 3
    assert same(got.prediction, want.prediction)


async def test_a_fork_at_the_session_cap_leaves_a_spilled_source_where_it_is(
    make_engine: EngineFactory,
) -> None:
    """Refused for the cap before its source is brought back: a refused request moves nothing
    (it restored the spilled source first, evicting another session to make room)."""
    observer = RecordingObserver()
    engine = await make_engine(slots=1, max_sessions=2, observer=observer)
    parent, _ = await engine.create_session("tok")
    other, _ = await engine.create_session("tok")  # `parent` is evicted now
    assert parent.slot is None and other.slot is not None
    with pytest.raises(SessionLimit):
        await engine.fork_session(parent.session_id)
    assert parent.slot is None and other.slot is not None
    assert (observer.count("restored"), observer.count("evicted")) == (0, 1)


async def test_a_fork_whose_record_cannot_be_made_durable_is_refused_and_counted(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork's child has no journal record: its first checkpoint, fsynced with its directory,
    is all of it. When the directory's fsync fails the fork is refused like one whose record
    the disk refused: counted as a failed checkpoint write, the child ended and its record
    deleted. It was an OSError nobody caught: the child stayed live, not durable, and
    uncounted. Nor is it counted as a session made and then closed (`forked` and `closed`
    events for a session no client ever had)."""
    observer = RecordingObserver()
    engine = await make_engine(observer=observer)
    parent, _ = await engine.create_session("tok", seed=3)
    await engine.feed(parent.session_id, toks(10, 20))
    records = set(engine.spill.directory.glob("*.spill"))

    def failing(directory: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spill_tier, "fsync_dir", failing)
    with pytest.raises(Internal):
        await engine.fork_session(parent.session_id)
    monkeypatch.undo()
    assert engine.stats().state_write_failures == 1
    assert [s.session_id for s in engine.sessions] == [parent.session_id]
    assert set(engine.spill.directory.glob("*.spill")) == records
    assert (observer.count("forked"), observer.count("closed")) == (0, 0)
    child = await engine.fork_session(parent.session_id)  # the disk is fine again
    assert child.position == 2 and engine.stats().state_write_failures == 1
    assert (observer.count("forked"), observer.count("closed")) == (1, 0)

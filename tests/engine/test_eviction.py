"""A pool far smaller than the sessions: LRU idle sessions go to the spill tier and come back
on their next request exactly as if they had never left."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc
import pytest

from service.errors import FailedPrecondition, PoolExhausted, ResourceExhausted, SpillTierFull
from service.runtime.sampler import SamplingParams

from .conftest import (
    FRAMES,
    TOK_SLOT_BYTES,
    EngineFactory,
    RecordingObserver,
    frames,
    same,
    toks,
    wait_idle,
)


async def test_many_more_sessions_than_slots_answer_like_never_evicted(
    make_engine: EngineFactory,
) -> None:
    observer = RecordingObserver()
    tiny = await make_engine(slots=4, observer=observer)
    roomy = await make_engine()
    pairs = []
    for i in range(14):
        a, _ = await tiny.create_session("tok", seed=100 + i)
        b, _ = await roomy.create_session("tok", seed=100 + i)
        pairs.append((a.session_id, b.session_id))
    for round_ in range(3):
        for i, (a, b) in enumerate(pairs):
            chunk = toks(*[(i * 31 + round_ * 7 + k) % 256 for k in range(1 + (i + round_) % 3)])
            got = await tiny.feed(a, chunk)
            want = await roomy.feed(b, chunk)
            assert got.position == want.position
            assert same(got.prediction, want.prediction), f"session {i}, round {round_}"
    # Generation samples from the restored last output with the restored RNG.
    sampling = SamplingParams(temperature=1.0, max_tokens=6)
    for a, b in pairs:
        got_tokens = [t.token_id async for t in tiny.generate(a, sampling=sampling)]
        want_tokens = [t.token_id async for t in roomy.generate(b, sampling=sampling)]
        assert got_tokens == want_tokens

    assert observer.count("evicted") > 0 and observer.count("restored") > 0
    pool = tiny.versions.find("tok", 1)
    assert pool is not None and pool.pool.capacity <= 4
    assert tiny.budget.used_bytes <= tiny.budget.limit_bytes
    spilled = [s for s in tiny.sessions if s.slot is None]
    assert len(spilled) == 14 - 4
    # Every spilled session has its record (with the journal on, resident ones keep their last
    # checkpoint there too).
    assert all(s.session_id in tiny.spill for s in spilled) and tiny.stats().spilled_bytes > 0


async def test_eviction_takes_the_least_recently_used_idle_session(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(slots=3)
    ids = [(await engine.create_session("tok", seed=i))[0].session_id for i in range(3)]
    await engine.feed(ids[0], toks(1))  # ids[1] is now the least recently used
    fourth, _ = await engine.create_session("tok")
    assert engine.get_session(ids[1]).slot is None
    assert all(engine.get_session(i).slot is not None for i in (ids[0], ids[2]))
    assert fourth.slot is not None


async def test_nothing_evictable_is_resource_exhausted_and_recovers(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(
        slots=2, slot_wait_seconds=0.0, engine={"max_generate_tokens": 1_000_000}
    )
    a, _ = await engine.create_session("tok", seed=1)
    b, _ = await engine.create_session("tok", seed=2)
    long = SamplingParams(temperature=1.0, max_tokens=1_000_000)
    async with (
        aclosing(engine.generate(a.session_id, sampling=long)) as gen_a,
        aclosing(engine.generate(b.session_id, sampling=long)) as gen_b,
    ):
        await anext(gen_a)
        await anext(gen_b)  # both sessions are busy generating: neither may be evicted
        with pytest.raises(PoolExhausted) as err:
            await engine.create_session("tok")
        assert isinstance(err.value, ResourceExhausted)
    await wait_idle(a, b)
    # With one generating, forking the other has no victim either (the source is busy too).
    async with aclosing(engine.generate(a.session_id, sampling=long)) as gen_a:
        await anext(gen_a)
        with pytest.raises(PoolExhausted):
            await engine.fork_session(b.session_id)
    # Generations over: the sessions are idle again, so one is evicted for the newcomer.
    await wait_idle(a, b)
    c, _ = await engine.create_session("tok")
    assert c.slot is not None
    assert {a.slot is None, b.slot is None} == {True, False}


async def test_a_request_waits_for_a_busy_session_to_go_idle(make_engine: EngineFactory) -> None:
    """Every slot busy: a newcomer waits (bounded) instead of failing, and gets the slot of
    the first session to finish."""
    engine = await make_engine(slots=1, slot_wait_seconds=60.0)
    a, _ = await engine.create_session("tok", seed=1)
    async with aclosing(
        engine.generate(a.session_id, sampling=SamplingParams(temperature=1.0, max_tokens=40))
    ) as gen:
        await anext(gen)  # `a` is busy: the pool's only slot is taken
        waiting = asyncio.create_task(engine.create_session("tok"))
        tokens = [t async for t in gen]  # drain the generation; `a` goes idle after it
        assert tokens[-1].finish_reason == "max_tokens"
    b, _ = await waiting
    assert b.slot is not None and a.slot is None
    assert (await engine.feed(a.session_id, toks(1))).position == 41  # restored, waiting no more


async def test_full_spill_tier_is_resource_exhausted_without_harm(
    make_engine: EngineFactory,
) -> None:
    tiny = await make_engine(slots=2, spill_max_bytes=1)
    roomy = await make_engine()
    pairs = []
    for seed in (1, 2):
        a, _ = await tiny.create_session("tok", seed=seed)
        b, _ = await roomy.create_session("tok", seed=seed)
        pairs.append((a.session_id, b.session_id))
    with pytest.raises(SpillTierFull):
        await tiny.create_session("tok")
    for a, b in pairs:  # the refused eviction touched nothing
        assert same(
            (await tiny.feed(a, toks(5, 6))).prediction,
            (await roomy.feed(b, toks(5, 6))).prediction,
        )
    assert len(tiny.spill) == 0 and tiny.stats().spilled_bytes == 0


async def test_versions_share_the_budget_by_reclaiming_idle_capacity(
    make_engine: EngineFactory,
) -> None:
    """A second model gets slots out of a budget the first model's pool had taken whole."""
    engine = await make_engine(pool_bytes=6 * TOK_SLOT_BYTES, pool_initial_slots=64)
    roomy = await make_engine()
    tok = [(await engine.create_session("tok", seed=i))[0].session_id for i in range(6)]
    ref = [(await roomy.create_session("tok", seed=i))[0].session_id for i in range(6)]
    for a, b in zip(tok, ref, strict=True):
        assert same(
            (await engine.feed(a, toks(9))).prediction, (await roomy.feed(b, toks(9))).prediction
        )
    frame_ids = []
    for _ in range(4):  # needs capacity the tok pool holds: its idle sessions are evicted
        session, _ = await engine.create_session("frames")
        frame_ids.append(session.session_id)
        out = await engine.feed(session.session_id, frames(0.5, -0.5, 1.0))
        assert len(out.prediction.values) == 2
    assert engine.budget.used_bytes <= engine.budget.limit_bytes
    for a, b in zip(tok, ref, strict=True):  # and come back intact
        assert same(
            (await engine.feed(a, toks(3, 4))).prediction,
            (await roomy.feed(b, toks(3, 4))).prediction,
        )


async def _busy_tok_and_a_frames_create(
    make_engine: EngineFactory, busy_slot: int
) -> tuple[RecordingObserver, list[str], Exception | None]:
    """Four TOK sessions fill the whole budget; the one in `busy_slot` generates while a
    FRAMES session is created. Returns the observer, the TOK ids and the create's error."""
    observer = RecordingObserver()
    engine = await make_engine(
        slots=4, slot_wait_seconds=0.0, observer=observer, engine={"max_generate_tokens": 100_000}
    )
    tok = [(await engine.create_session("tok", seed=i))[0] for i in range(4)]
    assert sorted(s.slot for s in tok) == [0, 1, 2, 3]
    assert engine.budget.used_bytes == engine.budget.limit_bytes  # FRAMES has no room left
    busy = next(s for s in tok if s.slot == busy_slot)
    long = SamplingParams(temperature=1.0, max_tokens=100_000)
    error: Exception | None = None
    async with aclosing(engine.generate(busy.session_id, sampling=long)) as gen:
        await anext(gen)
        try:
            await engine.create_session("frames")
        except PoolExhausted as exc:
            error = exc
        assert busy.slot == busy_slot and busy.busy  # a busy session never moves
    await wait_idle(busy)
    return observer, [s.session_id for s in tok], error


async def test_a_busy_session_atop_another_pool_evicts_nothing_for_nothing(
    make_engine: EngineFactory,
) -> None:
    """The TOK pool cannot shrink past its busy top slot, so evicting its idle sessions would
    free nothing for FRAMES: the create is refused at once, saying so, and they stay."""
    observer, _, error = await _busy_tok_and_a_frames_create(make_engine, busy_slot=3)
    assert observer.count("evicted") == 0
    assert isinstance(error, PoolExhausted)
    assert "busy sessions hold the rest" in str(error) and "every session" not in str(error)


async def test_a_busy_session_low_in_another_pool_costs_one_eviction(
    make_engine: EngineFactory,
) -> None:
    """The control: with the busy session in slot 0 the TOK pool can shrink, and the create
    takes one idle TOK session's slot, no more."""
    observer, _, error = await _busy_tok_and_a_frames_create(make_engine, busy_slot=0)
    assert error is None
    assert observer.count("evicted") == 1


async def test_another_pool_too_small_to_free_a_slot_is_left_alone(
    make_engine: EngineFactory,
) -> None:
    """Evicting every FRAMES session would free less than one TOK slot: a new TOK session
    evicts the least recently used TOK session instead, though the FRAMES ones are older."""
    frames_slot = 4 * FRAMES.state_numel()
    observer = RecordingObserver()
    engine = await make_engine(
        pool_bytes=4 * TOK_SLOT_BYTES + 3 * frames_slot, pool_initial_slots=1, observer=observer
    )
    olds = [(await engine.create_session("frames"))[0] for _ in range(3)]
    tok = [(await engine.create_session("tok", seed=i))[0] for i in range(4)]
    assert engine.budget.used_bytes == engine.budget.limit_bytes
    fifth, _ = await engine.create_session("tok")
    assert fifth.slot is not None and observer.count("evicted") == 1
    assert all(s.slot is not None for s in olds)
    assert tok[0].slot is None and all(s.slot is not None for s in tok[1:])


async def test_a_budget_smaller_than_one_session_of_a_version_refuses_it_naming_the_setting(
    make_engine: EngineFactory,
) -> None:
    """`pool_bytes` below one TOK slot: no TOK session can ever be held. Before, the first
    create waited out `slot_wait_seconds` and said "every session in memory is busy", with none
    in memory; now the version is refused at its load (FAILED_PRECONDITION), the message naming
    the setting, its value and the slot's size. FRAMES, whose slot fits, serves."""
    budget = TOK_SLOT_BYTES // 2
    assert 4 * FRAMES.state_numel() <= budget
    engine = await make_engine(pool_bytes=budget, pool_initial_slots=1)
    with pytest.raises(FailedPrecondition) as err:
        await asyncio.wait_for(engine.create_session("tok"), 2)
    assert err.value.status == grpc.StatusCode.FAILED_PRECONDITION
    assert "SEQSERVE_SESSIONS__POOL_BYTES" in err.value.message
    assert f"{budget} bytes" in err.value.message
    assert f"{TOK_SLOT_BYTES} bytes" in err.value.message
    made, _ = await engine.create_session("frames")
    assert (await engine.feed(made.session_id, frames(1, 2, 3))).position == 1

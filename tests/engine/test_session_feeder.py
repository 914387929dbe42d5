"""`SessionEngine.feed_many` (`SessionFeeder`): many sessions fed at once (one Stream message's
feeds), each with its own outcome."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import pytest

from service.engine.session_engine import Feed, Line, ModelInput
from service.errors import InvalidArgument, PositionMismatch, Unavailable
from service.runtime.sampler import SamplingParams
from service.runtime.step_batch import StepBatch
from service.sessions.session import Session
from tests.polling import until

from .conftest import EngineFactory, close, crash, settled, slow_steps


async def test_each_item_reports_the_position_its_own_step_left(
    make_engine: EngineFactory,
) -> None:
    """A session of a fast version is released as soon as its row ran, while the call still
    waits on a slow version's group; another request may then step it again. The reply must
    still carry the position after *its* step, not a later one."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    a, _ = await engine.create_session("tok")
    b, _ = await engine.create_session("frames")
    slow_version = engine.versions.find("tok", 1)
    assert slow_version is not None
    execute = slow_version.runner.execute

    released = threading.Event()

    def slow(batch: StepBatch):  # type: ignore[no-untyped-def]
        # A big batch of a big model, running until the test has stepped B again (a fixed 1 s
        # here was all the margin a loaded host's stall had, and the group ended first).
        released.wait(60)
        return execute(batch)

    slow_version.runner.execute = slow  # type: ignore[method-assign]
    many = asyncio.create_task(
        engine.feed_many(
            [
                Feed(a.session_id, ModelInput(tokens=[1])),
                Feed(b.session_id, ModelInput(frames=[0.1, 0.2, 0.3])),
            ]
        )
    )
    try:
        await until(
            lambda: b.position == 1 and not b.busy,
            60,
            "B's own row to run and B to be free again",
            interval=0.002,
        )
        assert not many.done(), "the slow version's group should still be running"
        meanwhile = await engine.feed(b.session_id, ModelInput(frames=[0.1, 0.2, 0.3]))
        assert meanwhile.position == 2
    finally:
        released.set()
    outcomes = await many
    assert [o.position for o in outcomes] == [1, 1]  # type: ignore[union-attr]


async def test_errors_stay_with_their_items(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    a, _ = await engine.create_session("tok")
    b, _ = await engine.create_session("tok")
    outcomes = await engine.feed_many(
        [
            Feed(a.session_id, ModelInput(tokens=[999])),  # out of the vocabulary
            Feed(b.session_id, ModelInput(tokens=[1, 2])),
            Feed("s_unknown", ModelInput(tokens=[1])),
        ]
    )
    assert isinstance(outcomes[0], InvalidArgument)
    assert outcomes[1].position == 2  # type: ignore[union-attr]
    assert type(outcomes[2]).__name__ == "SessionNotFound"
    assert a.position == 0 and not a.busy and not b.busy


async def test_draining_refuses_every_item(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    a, _ = await engine.create_session("tok")
    engine.begin_draining()
    outcomes = await engine.feed_many([Feed(a.session_id, ModelInput(tokens=[1]))])
    assert isinstance(outcomes[0], Unavailable) and a.position == 0
    assert "draining" in outcomes[0].message and not a.busy


async def test_a_call_cancelled_before_its_slow_feeds_start_lets_their_leases_go(
    make_engine: EngineFactory,
) -> None:
    """Cancelled in the same tick it started: the spilled session's lease (taken up front) is
    still let go, and a lease that was waiting in a line leaves the line."""
    engine = await make_engine()
    spilled, _ = await engine.create_session("tok")
    engine.residency.spill(spilled)  # the slow path: it needs a restore
    waiting, _ = await engine.create_session("tok")
    line = Line()
    holder = engine.leases.take(waiting.session_id, line)
    loop = asyncio.get_running_loop()
    call = loop.create_task(
        engine.feed_many(
            [Feed(spilled.session_id, ModelInput(tokens=[1])),
             Feed(waiting.session_id, ModelInput(tokens=[1]))],
            line,
        )
    )  # fmt: skip
    loop.call_soon(call.cancel)  # after the call's first step, before its feeds' tasks run
    with pytest.raises(asyncio.CancelledError):
        await call
    engine.leases.release(holder)
    await asyncio.sleep(0.01)
    assert not spilled.busy and not waiting.busy
    assert (await engine.feed(spilled.session_id, ModelInput(tokens=[2]))).position == 1
    assert (await engine.feed(waiting.session_id, ModelInput(tokens=[2]))).position == 1


async def test_stopping_ends_a_running_generation_for_its_consumer(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(engine={"max_generate_tokens": 4000})
    session, _ = await engine.create_session("tok")
    tokens = engine.generate(session.session_id, sampling=SamplingParams(max_tokens=4000))
    await anext(tokens)
    stopping = asyncio.create_task(engine.stop())
    with pytest.raises(Unavailable):
        async with asyncio.timeout(10):
            async for _ in tokens:
                pass
    await asyncio.wait_for(stopping, 10)


async def test_a_prompted_generation_samples_in_the_step_right_after_its_prompt(
    make_engine: EngineFactory,
) -> None:
    """The scheduler gathers ticks before each step, so a generation started as its prompt's
    step settles joins the very next step, even while another generation keeps the scheduler
    stepping back to back (with a one-tick flush it missed that step)."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    busy, _ = await engine.create_session("tok")
    session, _ = await engine.create_session("tok")
    served = engine.versions.find("tok", 1)
    assert served is not None
    steps: list[list[tuple[int, bool]]] = []  # (slot, generating) per row
    execute = served.runner.execute

    def spy(batch: StepBatch):  # type: ignore[no-untyped-def]
        steps.append([(r.slot, r.inputs is None) for r in batch.rows])
        return execute(batch)

    served.runner.execute = spy  # type: ignore[method-assign]

    async def drain() -> None:
        async for _ in engine.generate(busy.session_id, sampling=SamplingParams(max_tokens=400)):
            pass

    background = asyncio.create_task(drain())
    while len(steps) < 3:  # the other generation is stepping
        await asyncio.sleep(0.001)
    prompt = ModelInput(tokens=[1, 2, 3])
    tokens = [
        t async for t in engine.generate(session.session_id, prompt, SamplingParams(max_tokens=2))
    ]
    assert [t.position for t in tokens] == [4, 5]
    slot = session.slot
    prompt_step = next(i for i, rows in enumerate(steps) if (slot, False) in rows)
    assert (slot, True) in steps[prompt_step + 1]
    background.cancel()
    with pytest.raises(asyncio.CancelledError):
        await background


@pytest.mark.parametrize("many", [True, False])
async def test_a_feed_cancelled_inside_its_step_is_remembered_for_its_retry(
    make_engine: EngineFactory, many: bool
) -> None:
    """The caller goes away (the client or a proxy cancelled the call) after the row went into
    a step: the feed is applied all the same, so its retry (same request id, same expected
    position) must get the original reply, not a position mismatch, and apply nothing."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    session, _ = await engine.create_session("tok")
    feed = Feed(session.session_id, ModelInput(tokens=[7]), expected_position=0, request_id="r1")
    with slow_steps(engine) as in_step:
        if many:
            call = asyncio.create_task(engine.feed_many([feed]))
        else:
            call = asyncio.create_task(
                engine.feed(feed.session_id, feed.input, expected_position=0, request_id="r1")
            )
        await asyncio.wait_for(in_step.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await settled(session, 1)
    retry = await engine.feed(feed.session_id, feed.input, expected_position=0, request_id="r1")
    assert retry.position == 1 == session.position  # the original reply; applied once


async def test_a_fed_session_is_freed_when_closed_without_the_cycle_collector(
    make_engine: EngineFactory,
) -> None:
    """A session keeps its last reply for a retry; a reply that named its session made every
    fed session a reference cycle, freed only by the cycle collector, whose collections over a
    heap of 100,000 sessions stall the event loop for half a second. Closed, it is freed at
    once, by its reference count."""
    engine = await make_engine()
    session, _ = await engine.create_session("tok")
    sid = session.session_id
    await engine.feed(sid, ModelInput(tokens=[1]), request_id="r-1")
    assert session.last_request is not None and session.last_request.request_id == "r-1"
    del session
    gc.collect()
    gc.disable()
    try:
        await engine.close_session(sid)
        await asyncio.sleep(0)  # callbacks that let the session go
        left = [o for o in gc.get_objects() if type(o) is Session and o.session_id == sid]
    finally:
        gc.enable()
    assert left == []


async def test_a_feed_whose_step_wrote_the_periodic_checkpoint_is_retried_after_a_crash(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """A Stream message's feeds let their sessions go as their step settles, and letting go
    writes a session's due periodic checkpoint; that checkpoint recorded the request before
    (the feed was remembered only when the call resumed), so after a crash (or a clean
    restart) nothing after the checkpoint named the feed, and its retry was refused with a
    position mismatch. A chaos run found it (about one feed in `checkpoint_steps`)."""
    spill = tmp_path / "state"
    engine = await make_engine(spill_dir=spill, checkpoint_steps=2)
    a, _ = await engine.create_session("tok")
    b, _ = await engine.create_session("tok")
    last = None
    for k in range(2):  # the second step makes both sessions due: checkpointed at 2
        outcomes = await engine.feed_many(
            [
                Feed(s.session_id, ModelInput(tokens=[k + 1]), request_id=f"{s.session_id}-{k}")
                for s in (a, b)
            ]
        )
        last = outcomes[0]
    await crash(engine)
    again = await make_engine(spill_dir=spill, checkpoint_steps=2)
    retried = await again.feed(
        a.session_id, ModelInput(tokens=[2]), expected_position=1, request_id=f"{a.session_id}-1"
    )
    assert retried.position == 2 == last.position  # type: ignore[union-attr]
    assert close(retried.prediction, last.prediction)  # type: ignore[union-attr]


async def test_a_message_waiting_behind_another_keeps_its_own_request_for_retry(
    make_engine: EngineFactory,
) -> None:
    """Two messages of one Stream feed one session: the second waits for the first's lease,
    which goes as the first's step settles, and steps at once (the session stepped alone last
    time) before the first call resumes. Resuming, the first remembered *its* request as the
    session's last, over the second's, so the second's retry was refused with a position
    mismatch."""
    engine = await make_engine(engine={"inline_max_rows": 1})
    session, _ = await engine.create_session("tok")
    sid = session.session_id
    first = Feed(sid, ModelInput(tokens=[3]), expected_position=0, request_id="first")
    second = Feed(sid, ModelInput(tokens=[4]), request_id="second")
    line = Line()  # one Stream's messages: the second queues for the session
    one = asyncio.create_task(engine.feed_many([first], line))
    two = asyncio.create_task(engine.feed_many([second], line))
    ones, twos = await asyncio.gather(one, two)
    assert [ones[0].position, twos[0].position] == [1, 2]  # type: ignore[union-attr]
    assert session.last_request is not None and session.last_request.request_id == "second"
    retry = await engine.feed(sid, second.input, expected_position=1, request_id="second")
    assert retry.position == 2 == session.position  # the original reply; applied once


@pytest.mark.parametrize("many", [True, False])
async def test_a_feed_without_request_id_cancelled_inside_its_step_ends_the_retry_of_the_one_before(
    make_engine: EngineFactory, many: bool
) -> None:
    """A feed with no request id is applied all the same when its caller goes away inside its
    step: the request before it is no longer the session's last, so a retry of that one must
    be told the position moved on, not given its old reply (the unary path kept it)."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    session, _ = await engine.create_session("tok")
    sid = session.session_id
    await engine.feed(sid, ModelInput(tokens=[7]), expected_position=0, request_id="r1")
    with slow_steps(engine) as in_step:
        if many:
            call = asyncio.create_task(engine.feed_many([Feed(sid, ModelInput(tokens=[8]))]))
        else:
            call = asyncio.create_task(engine.feed(sid, ModelInput(tokens=[8])))
        await asyncio.wait_for(in_step.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await settled(session, 2)
    assert session.last_request is None
    with pytest.raises(PositionMismatch):
        await engine.feed(sid, ModelInput(tokens=[7]), expected_position=0, request_id="r1")

"""The session lease: one holder at a time (ABORTED for anyone else), a line's requests wait
their turn in the order they were taken, a cancelled waiter gives up its place, a lease outlives
the step it started, and a lookup never ends a session."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.session_line import Line
from service.errors import Aborted, SessionClosed, SessionExpired

from .conftest import EngineFactory, FakeClock, toks


async def test_a_second_holder_is_aborted_and_the_session_is_free_after(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    session, _ = await engine.create_session("tok")
    async with engine.leases.hold(session.session_id) as lease:
        assert lease.session is session and session.busy
        with pytest.raises(Aborted):
            engine.leases.take(session.session_id)
        with pytest.raises(Aborted):  # a line does not queue behind another caller
            engine.leases.take(session.session_id, Line())
    assert not session.busy
    assert (await engine.feed(session.session_id, toks(1))).position == 1


async def test_a_line_waits_its_turn_in_the_order_it_was_taken(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    session, _ = await engine.create_session("tok")
    line = Line()
    order: list[int] = []

    async def feed(n: int) -> None:
        outcome = await engine.feed(session.session_id, toks(n), line=line)
        order.append(outcome.position)

    async with engine.leases.hold(session.session_id, line):
        tasks = [asyncio.create_task(feed(n)) for n in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert order == []  # all three wait for the holder
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [1, 2, 3] and not session.busy


async def test_a_cancelled_waiter_gives_up_its_place(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    session, _ = await engine.create_session("tok")
    line = Line()
    holder = engine.leases.take(session.session_id, line)
    gone = asyncio.create_task(engine.feed(session.session_id, toks(1), line=line))
    kept = asyncio.create_task(engine.feed(session.session_id, toks(2), line=line))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0)
    engine.leases.release(holder)
    assert (await asyncio.wait_for(kept, 5)).position == 1  # only the kept feed ran
    assert gone.cancelled() and session.position == 1 and not session.busy


async def test_a_waiter_finds_the_session_closed_by_the_holder(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    session, _ = await engine.create_session("tok")
    line = Line()
    async with engine.leases.hold(session.session_id, line, bring_in=False) as lease:
        waiter = asyncio.create_task(engine.feed(session.session_id, toks(1), line=line))
        await asyncio.sleep(0.01)
        engine.lifecycle.end(lease.session, "closed")
    with pytest.raises(SessionClosed):
        await asyncio.wait_for(waiter, 5)


async def test_a_lease_is_let_go_only_when_its_step_settles(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    session, _ = await engine.create_session("tok")
    lease = engine.leases.take(session.session_id)
    settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    lease.in_flight = settled  # e.g. a step its cancelled caller left running
    engine.leases.release(lease)
    assert session.busy  # the step may still write the slot: nothing may evict or use it
    with pytest.raises(Aborted):
        engine.leases.take(session.session_id)
    settled.set_result(None)
    await asyncio.sleep(0)
    assert not session.busy
    engine.leases.release(lease)  # releasing twice changes nothing
    assert (await engine.feed(session.session_id, toks(1))).position == 1


async def test_a_lookup_never_ends_a_session(make_engine: EngineFactory) -> None:
    clock = FakeClock()
    engine = await make_engine(clock=clock)
    session, _ = await engine.create_session("tok", ttl_seconds=10.0)
    clock.advance(11.0)
    for _ in range(2):  # expired, and still expired: the lookup did not end it
        with pytest.raises(SessionExpired):
            engine.leases.take(session.session_id)
    assert not session.closed and len(engine.sessions) == 1
    assert await engine.sweep_expired() == 1
    assert session.closed and len(engine.sessions) == 0

"""A Stream's items for one session are applied in item order even when something suspends
before the lease: with auth on and a shared state tier (a real redis-server; the workers'
SQLite file), each feed first charges the caller's quota in the tier (a thread) and may take
the session over. The tier's calls are slowed at random here, so that a later item whose charge
returns first would take the lease, and be applied, before an earlier one."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from service.api.session_servicer import SessionServicer
from service.engine.session_line import Line
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.security import principal
from service.security.principal import Principal
from service.sessions.shared_tier import SharedState

from .conftest import EngineFactory

ITEMS = 24
LIMITS = {"tokens_per_second": 10**6}  # charged in the tier, never refused


@pytest.fixture
def slow_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every charge waits 0-20 ms in its thread, in no particular order."""
    take = SharedState.take_tokens
    rng = random.Random(7)

    def slow(self: SharedState, owner: str, tokens: int, rate: float) -> float:
        time.sleep(rng.uniform(0, 0.02))
        return take(self, owner, tokens, rate)

    monkeypatch.setattr(SharedState, "take_tokens", slow)


def _feed(session_id: str, k: int) -> pb.StreamItem:
    return pb.StreamItem(
        session_id=session_id,
        request_id=f"r{k}",
        input=types.Input(tokens=types.Tokens(ids=[k % 8])),
    )


def _generate(session_id: str, k: int) -> pb.StreamItem:
    return pb.StreamItem(
        session_id=session_id,
        request_id=f"r{k}",
        generate=types.GenerateSpec(sampling=types.Sampling(temperature=0.0, max_tokens=1)),
    )


async def _positions(servicer: SessionServicer, messages: list[pb.StreamRequest]) -> list[int]:
    """The position each item left the session at, by item (one reply each, one token)."""

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        for message in messages:  # all sent at once, no reply awaited
            yield message

    replies = {}
    async for response in servicer.Stream(requests(), None):
        for reply in response.replies:
            assert not reply.HasField("error"), reply.error
            replies[reply.request_id] = reply.position
    return [replies[f"r{k}"] for k in range(len(replies))]


async def _servicer(make_engine: EngineFactory, state_url: str) -> SessionServicer:
    engine = await make_engine(state_url=state_url, security=LIMITS)
    principal.current.set(Principal("alice", "client"))
    return SessionServicer(engine, max_items_per_message=64, max_message_bytes=0)


@pytest.mark.usefixtures("slow_tier")
async def test_one_sessions_feeds_in_one_message_apply_in_item_order(
    make_engine: EngineFactory, state_url: str
) -> None:
    servicer = await _servicer(make_engine, state_url)
    session, _ = await servicer.engine.create_session("tok")
    sid = session.session_id
    message = pb.StreamRequest(items=[_feed(sid, k) for k in range(ITEMS)])
    assert await _positions(servicer, [message]) == list(range(1, ITEMS + 1))


@pytest.mark.usefixtures("slow_tier")
async def test_feeds_and_generations_sent_ahead_apply_in_item_order(
    make_engine: EngineFactory, state_url: str
) -> None:
    """Messages sent without waiting for replies, a generation among the feeds: each item
    runs after the one before it, whatever message it came in."""
    servicer = await _servicer(make_engine, state_url)
    session, _ = await servicer.engine.create_session("tok")
    sid = session.session_id
    first = pb.StreamRequest(items=[_feed(sid, 0), _feed(sid, 1)])  # the multiplexer's
    rest = [
        pb.StreamRequest(items=[_generate(sid, k) if k % 5 == 0 else _feed(sid, k)])
        for k in range(2, ITEMS)
    ]
    assert await _positions(servicer, [first, *rest]) == list(range(1, ITEMS + 1))


@pytest.mark.usefixtures("slow_tier")
async def test_a_session_taken_over_runs_its_items_in_item_order(
    make_engine: EngineFactory, state_url: str
) -> None:
    """The session is held by another replica: the first item takes it over (the tier's
    calls), a generation first, which needs the session's defaults before it runs."""
    holder = await make_engine(state_url=state_url, security=LIMITS)
    servicer = await _servicer(make_engine, state_url)
    session, _ = await holder.create_session("tok")
    sid = session.session_id
    first = pb.StreamRequest(
        items=[_generate(sid, k) if k % 3 == 0 else _feed(sid, k) for k in range(ITEMS)]
    )
    assert await _positions(servicer, [first]) == list(range(1, ITEMS + 1))


async def test_an_item_refused_before_its_turn_lets_no_later_one_pass_an_earlier() -> None:
    """The line's order alone: the second request gives up (its charge refused) while the first
    still awaits the tier; the third waits for the first all the same."""
    line = Line()
    first, second, third = (line.enter(["s"]) for _ in range(3))
    charged = asyncio.Event()  # the first's charge, still on its way
    order: list[str] = []

    async def first_request() -> None:
        await charged.wait()
        await first.turn()
        order.append("first")

    async def third_request() -> None:
        await third.turn()
        order.append("third")

    tasks = [asyncio.create_task(first_request()), asyncio.create_task(third_request())]
    second.leave()
    await asyncio.sleep(0.01)
    assert order == []  # the third waits for the first, not only for the second
    charged.set()
    await asyncio.gather(*tasks)
    assert order == ["first", "third"]

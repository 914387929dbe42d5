"""One create or fork request (one request id) reaching two replicas at once — a client that
retries on another replica while its first attempt still runs — makes one session, on the
shared tier (a real redis-server, and the SQLite file of `serve --workers`): the tier refuses
the second replica's session, and that replica answers with the first's, as a retry would.
Before, each replica looked in the tier, found nothing, and made a session of its own."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from service.engine.feed import PredictionOptions
from service.engine.session_engine import SessionEngine
from service.errors import SessionMoved

from .conftest import EngineFactory, close, toks


def _after_its_look(replica: SessionEngine, meanwhile: Callable[[], Awaitable[Any]]) -> list[Any]:
    """`replica`'s first look for what a request made finds nothing, and the same request's
    call on another replica (`meanwhile`) runs to its end right after that look: the two calls
    at once, in the order that races. The list gets what `meanwhile` returned."""
    look = replica.maker._made
    done: list[Any] = []

    async def late(key: str) -> Any:
        found = await look(key)
        if not done:
            done.append(await meanwhile())
        return found

    replica.maker._made = late  # type: ignore[method-assign]
    return done


def _sessions_in_tier(state_url: str) -> int:
    """How many live sessions the tier holds."""
    if state_url.startswith("redis"):
        return len(redis.Redis.from_url(state_url).keys("seqserve:h:*"))
    db = sqlite3.connect(state_url.removeprefix("sqlite:"))
    try:
        return int(db.execute("SELECT count(*) FROM holders").fetchone()[0])
    finally:
        db.close()


async def test_one_create_on_two_replicas_at_once_makes_one_session(
    make_engine: EngineFactory, state_url: str
) -> None:
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    options = PredictionOptions(top_k=4)
    first = _after_its_look(
        b,
        lambda: a.create_session("tok", seed=3, prefix=toks(1, 2), options=options, request_id="c"),
    )
    made, outcome = await b.create_session(
        "tok", seed=3, prefix=toks(1, 2), options=options, request_id="c"
    )
    ((a_made, a_outcome),) = first
    assert made.session_id == a_made.session_id and made.position == 2
    assert outcome is not None and a_outcome is not None
    assert close(outcome.prediction, a_outcome.prediction)
    assert _sessions_in_tier(state_url) == 1
    # The one session goes on from its prefix, through either replica (b took it over: a's
    # copy is refused once, UNAVAILABLE, and the client's retry takes it back).
    assert (await b.feed(made.session_id, toks(3))).position == 3
    with pytest.raises(SessionMoved):
        await a.feed(made.session_id, toks(4))
    assert (await a.feed(made.session_id, toks(4))).position == 4
    assert _sessions_in_tier(state_url) == 1


async def test_one_create_without_a_prefix_on_two_replicas_at_once_makes_one_session(
    make_engine: EngineFactory, state_url: str
) -> None:
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    first = _after_its_look(b, lambda: a.create_session("tok", request_id="c"))
    made, outcome = await b.create_session("tok", request_id="c")
    ((a_made, _),) = first
    assert made.session_id == a_made.session_id and made.position == 0 and outcome is None
    assert _sessions_in_tier(state_url) == 1
    again, _ = await a.create_session("tok", request_id="c")  # a later retry: the same
    assert again.session_id == made.session_id
    assert _sessions_in_tier(state_url) == 1


async def test_one_fork_on_two_replicas_at_once_makes_one_child(
    make_engine: EngineFactory, state_url: str
) -> None:
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    parent, _ = await a.create_session("tok", prefix=toks(1, 2))
    # a checked that it holds the parent just before b took it over to fork it, and forks
    # its copy (the same state) while b does.
    first = _after_its_look(b, lambda: a.maker.fork(parent.session_id, request_id="f"))
    child = await b.fork_session(parent.session_id, request_id="f")
    (a_child,) = first
    assert child.session_id == a_child.session_id and child.position == 2
    assert _sessions_in_tier(state_url) == 2  # the parent and one child
    assert (await b.feed(child.session_id, toks(3))).position == 3


async def test_a_create_retried_later_than_one_ttl_finds_the_session_it_made_while_it_lives(
    make_engine: EngineFactory, state_url: str
) -> None:
    """The tier's pointer from a request id to the session it made was set for one TTL when
    the session was made and never kept alive with it: a session fed for longer than its TTL
    was made again by a retry of its create on another replica (two sessions, one request)."""
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    made, _ = await a.create_session("tok", request_id="c", ttl_seconds=1.0)
    for i in range(6):  # 1.8 s of steps, each within the TTL of the one before
        await asyncio.sleep(0.3)
        assert (await a.feed(made.session_id, toks(i))).position == i + 1
    again, _ = await b.create_session("tok", request_id="c", ttl_seconds=1.0)
    assert again.session_id == made.session_id
    assert _sessions_in_tier(state_url) == 1

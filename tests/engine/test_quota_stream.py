"""One Stream message's feeds against the caller's input tokens per second: up to a second's
worth in all they are charged together (one take from the bucket, all or none); more is charged
feed by feed in the message's order, as that many Steps would be, and the feeds after the first
the bucket refuses are refused with it. Charged together, a message of many sessions' feeds was
let through whole into a debt of any size (64 feeds of 100 tokens against a bucket of 20), and
the auto-multiplexing client sends concurrent feeds as such messages."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.feed import Feed
from service.engine.session_engine import SessionEngine
from service.errors import QuotaExceeded, SessionNotFound
from service.security import principal
from service.security.principal import Principal

from .conftest import EngineFactory, slow_takes, toks

RATE = 20.0  # tokens a second, and the bucket's size
SLOW = 0.01  # a bucket refilled this slowly gains at most 0.04 tokens while a test runs


async def _sessions(engine: SessionEngine, n: int) -> list[str]:
    principal.current.set(Principal("alice", "client"))
    return [(await engine.create_session("tok"))[0].session_id for _ in range(n)]


async def test_a_message_over_a_seconds_worth_is_charged_feed_by_feed(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(security={"tokens_per_second": RATE})
    sids = await _sessions(engine, 8)
    outcomes = await engine.feed_many([Feed(s, toks(*[1] * 10)) for s in sids])  # 80 tokens
    applied = [o for o in outcomes if not isinstance(o, Exception)]
    assert [o.position for o in applied] == [10, 10]  # the bucket's 20, in the message's order
    refused = outcomes[2:]
    assert all(isinstance(o, QuotaExceeded) for o in refused), refused
    assert all(o.retry_after is not None and o.retry_after > 0 for o in refused)  # type: ignore[union-attr]
    positions = [(await engine.describe_session(s)).position for s in sids]
    assert positions == [10, 10, 0, 0, 0, 0, 0, 0]  # the refused feeds changed nothing


async def test_one_feed_over_a_seconds_worth_leaves_a_full_bucket_in_debt_as_a_step_does(
    make_engine: EngineFactory,
) -> None:
    """The first feed may be larger than the bucket (as one Step may: else it could never
    pass); the feeds after it wait for the debt."""
    engine = await make_engine(security={"tokens_per_second": SLOW})
    a, b = await _sessions(engine, 2)
    first, second = await engine.feed_many([Feed(a, toks(*[1] * 30)), Feed(b, toks(1))])
    assert not isinstance(first, Exception) and first.position == 30
    assert isinstance(second, QuotaExceeded)
    assert (await engine.describe_session(b)).position == 0


async def test_a_message_within_a_seconds_worth_is_charged_whole(
    make_engine: EngineFactory,
) -> None:
    """Together: a bucket that lacks the whole message refuses all of it, though its first
    feed alone would fit (one take, one round trip to a shared tier)."""
    engine = await make_engine(security={"tokens_per_second": RATE})
    a, b, c = await _sessions(engine, 3)
    fed = await engine.feed_many([Feed(a, toks(*[1] * 8)), Feed(b, toks(*[1] * 8))])
    assert [getattr(o, "position", o) for o in fed] == [8, 8]  # 16 of the 20
    # 19 against the 4 left (and what refills meanwhile: 0.75 s would be needed), its first
    # feed's 3 among them.
    refused = await engine.feed_many([Feed(a, toks(1, 2, 3)), Feed(c, toks(*[1] * 16))])
    assert all(isinstance(o, QuotaExceeded) for o in refused), refused
    assert [(await engine.describe_session(s)).position for s in (a, b, c)] == [8, 8, 0]


async def test_a_message_s_feeds_refused_when_they_run_are_given_their_charge_back(
    make_engine: EngineFactory,
) -> None:
    """Charged together, 20 tokens: the unknown session's 15 come back, so a feed of 15 goes
    through next (the bucket would hold what refilled meanwhile, a few tokens, otherwise)."""
    engine = await make_engine(security={"tokens_per_second": RATE})
    a, b = await _sessions(engine, 2)
    fed, refused = await engine.feed_many([Feed(a, toks(*[1] * 5)), Feed("nope", toks(*[1] * 15))])
    assert getattr(fed, "position", fed) == 5 and isinstance(refused, SessionNotFound)
    (after,) = await engine.feed_many([Feed(b, toks(*[1] * 15))])
    assert getattr(after, "position", after) == 15


async def test_a_message_cancelled_while_the_tier_charges_its_feeds_keeps_nothing(
    make_engine: EngineFactory, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Charged feed by feed through the shared tier (a thread each take, which a cancel does
    not stop): cancelled at its second feed's take, the message runs nothing and the first
    feed's charge is given back. The rate is an eighth of a token a second: the first feed
    leaves the bucket 0.875 in debt, which 4 s of refill would not clear, so a one-token feed
    after it goes through only if that charge came back."""
    taking, taken = slow_takes(monkeypatch, lambda tokens: tokens == 2)  # the second feed's
    engine = await make_engine(security={"tokens_per_second": 0.125}, state_url=state_url)
    a, b = await _sessions(engine, 2)
    feeding = asyncio.create_task(engine.feed_many([Feed(a, toks(1)), Feed(b, toks(1, 2))]))
    await asyncio.to_thread(taking.wait, 5)
    feeding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await feeding
    await asyncio.to_thread(taken.wait, 5)
    await asyncio.sleep(0.05)  # the shielded give-back
    assert [(await engine.describe_session(s)).position for s in (a, b)] == [0, 0]
    assert (await engine.feed(a, toks(1))).position == 1  # the bucket was full again

"""The multiplexing client and message limits, and its close, over real gRPC: one feed over the
message limit fails alone; a tick of more feeds than a message may carry, or than a server with
lower limits takes, goes out in several messages, each feed applied once; a closed client's
feeds end instead of waiting forever."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.api.server import SeqServeServer
from service.client import errors
from service.client.client import SeqServeClient
from service.client.retry import RetryPolicy
from tests.api.conftest import ServerFactory, server, server_factory, store_root  # noqa: F401
from tests.client.test_multiplex import Recorded, _sessions, recorded

FAST = RetryPolicy(deadline_seconds=10, first_backoff_seconds=0.01, max_backoff_seconds=0.05)


async def test_a_feed_over_the_message_limit_fails_alone(
    server: SeqServeServer,  # noqa: F811
) -> None:
    """It used to go out with the others and break their Stream: each of them failed with its
    error, though the server had applied them."""
    limit = 64 * 1024
    async with SeqServeClient(f"127.0.0.1:{server.port}", max_message_bytes=limit) as c:
        big = await c.create_session("tok")
        sessions = [await c.create_session("tok") for _ in range(8)]
        got = await asyncio.gather(
            big.feed(tokens=[1] * 70_000),
            *(s.feed(tokens=[2] * 500) for s in sessions),
            return_exceptions=True,
        )
        assert isinstance(got[0], errors.ResourceExhaustedError)
        assert "max_message_bytes" in got[0].details()
        assert [getattr(p, "position", p) for p in got[1:]] == [500] * 8
        assert [(await s.refresh()).position for s in sessions] == [500] * 8
        assert (await big.refresh()).position == 0


async def test_more_feeds_than_a_message_may_carry_go_in_several_messages() -> None:
    servicer = Recorded()
    async with recorded(servicer) as target, SeqServeClient(target) as client:
        sessions = _sessions(client, 1100)
        got = await asyncio.gather(*(s.feed(tokens=[1]) for s in sessions))
    assert [p.position for p in got] == [1] * 1100
    (messages,) = servicer.messages
    assert [len(m) for m in messages] == [1024, 76]


@pytest.mark.parametrize(
    ("limits", "feeds", "chunk"),
    [
        ({"engine": {"max_items_per_message": 16}}, 40, 1),  # items refused in-band
        ({"server": {"max_message_bytes": 64 * 1024}}, 40, 2000),  # 80 KB: refused in-band
        ({"server": {"max_message_bytes": 64 * 1024}}, 80, 2000),  # 160 KB: the Stream fails
    ],
)
async def test_a_server_with_lower_limits_gets_smaller_messages(
    server_factory: ServerFactory,  # noqa: F811
    limits: dict[str, dict[str, int]],
    feeds: int,
    chunk: int,
) -> None:
    srv = await server_factory(server=limits.get("server"), **limits.get("engine", {}))
    async with SeqServeClient(f"127.0.0.1:{srv.port}", retry=FAST, timeout=30) as c:
        sessions = await asyncio.gather(*(c.create_session("tok") for _ in range(feeds)))
        got = await asyncio.gather(*(s.feed(tokens=[3] * chunk) for s in sessions))
        assert [p.position for p in got] == [chunk] * feeds
        again = await asyncio.gather(*(s.feed(tokens=[4]) for s in sessions))
        assert [p.position for p in again] == [chunk + 1] * feeds  # applied once each


async def test_a_feed_in_flight_when_the_client_closes_is_cancelled() -> None:
    servicer = Recorded(silent=10**6)
    async with recorded(servicer) as target:
        client = SeqServeClient(target, retry=FAST)
        (session,) = _sessions(client, 1)
        feed = asyncio.ensure_future(session.feed(tokens=[1]))
        await asyncio.sleep(0.05)  # on the Stream, unanswered
        await client.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(feed, 5)  # it used to be retried on the closed channel: hung
        with pytest.raises(grpc.aio.UsageError, match="closed"):
            await asyncio.wait_for(session.feed(tokens=[2]), 5)


async def test_a_feed_queued_when_the_client_closes_is_cancelled() -> None:
    servicer = Recorded()
    async with recorded(servicer) as target:
        client = SeqServeClient(target)
        (session,) = _sessions(client, 1)
        feed = asyncio.ensure_future(session.feed(tokens=[1]))
        await asyncio.sleep(0)  # queued: the flush is the next callback
        await client.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(feed, 5)

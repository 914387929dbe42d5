"""The echo server (the benchmark's bare gRPC ceiling) over real gRPC: its session ids carry
the routing key like the service's, so a multiplexing client groups them onto one Stream."""

from __future__ import annotations

import asyncio

from service.client.client import SeqServeClient
from service.sessions.session import route_of


async def test_session_ids_carry_the_route_key_and_feeds_coalesce(echo_target: str) -> None:
    async with SeqServeClient(echo_target, route_key="bench") as client:
        sessions = [await client.create_session("m") for _ in range(8)]
        assert {route_of(s.session_id) for s in sessions} == {"bench"}
        sizes: list[int] = []
        assert client.mux is not None
        client.mux.on_send = sizes.append
        got = await asyncio.gather(*(s.feed(tokens=[1, 2]) for s in sessions))
        assert [p.position for p in got] == [2] * 8
        assert sizes == [8] and client.mux.streams_opened == 1

"""The echo server (the benchmark's bare gRPC ceiling) over real gRPC: its session ids carry
the routing key like the service's, so a multiplexing client groups them onto one Stream."""

from __future__ import annotations

import asyncio

import grpc

from benchmarks.echo_server import EchoSessions
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.sessions.session import route_of


async def test_session_ids_carry_the_route_key_and_feeds_coalesce() -> None:
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(EchoSessions(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with SeqServeClient(f"127.0.0.1:{port}", route_key="bench") as client:
            sessions = [await client.create_session("m") for _ in range(8)]
            assert {route_of(s.session_id) for s in sessions} == {"bench"}
            sizes: list[int] = []
            assert client.mux is not None
            client.mux.on_send = sizes.append
            got = await asyncio.gather(*(s.feed(tokens=[1, 2]) for s in sessions))
            assert [p.position for p in got] == [2] * 8
            assert sizes == [8] and client.mux.streams_opened == 1
    finally:
        await server.stop(0)

"""The benchmark echo server on loopback, for tests that drive it over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from benchmarks.echo_server import EchoSessions
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc


@pytest.fixture
async def echo_target() -> AsyncIterator[str]:
    """The address of a running echo SessionService."""
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(EchoSessions(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)

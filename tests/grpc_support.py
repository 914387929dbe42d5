"""A servicer served over real gRPC on loopback, for tests that need a stand-in server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc


@asynccontextmanager
async def serving(servicer: Any) -> AsyncIterator[str]:
    """Serve `servicer` as the SessionService on 127.0.0.1; yields its address."""
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)

"""Fixtures for the HTTP/JSON API (`service.http`) over a real socket: an in-process server (the
gRPC tests' store of small random models) with its HTTP port on a free port, and an aiohttp
client. (This folder is not `tests/http`: that would shadow the standard library's `http`.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from service.api.server import SeqServeServer
from tests.api.conftest import ServerFactory, certs, server_factory, store_root

__all__ = ["certs", "server_factory", "store_root"]  # fixtures, used by name


@pytest.fixture
async def http_server(server_factory: ServerFactory) -> SeqServeServer:
    return await server_factory(server={"http_port": 0})


@pytest.fixture
async def http(http_server: SeqServeServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{http_server.http_port}") as session:
        yield session


@pytest.fixture
async def channel(http_server: SeqServeServer) -> AsyncIterator[grpc.aio.Channel]:
    """A plain gRPC channel to the same server, for answers to compare with HTTP's."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{http_server.port}") as ch:
        yield ch


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events as (event, data) pairs."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events

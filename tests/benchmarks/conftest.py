"""The benchmark echo server on loopback, for tests that drive it over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from benchmarks.echo_server import EchoSessions
from tests.grpc_support import serving


@pytest.fixture
async def echo_target() -> AsyncIterator[str]:
    """The address of a running echo SessionService."""
    async with serving(EchoSessions()) as target:
        yield target

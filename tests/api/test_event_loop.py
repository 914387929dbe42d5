"""The event loop and gRPC server set-up shared by `seqserve serve` and the echo server."""

from __future__ import annotations

import asyncio
import sys

import pytest

from service.api import event_loop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_run_uses_uvloop_when_it_is_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert event_loop.loop_name() == "uvloop"
    assert event_loop.run(_loop_type()) is uvloop.Loop


def test_run_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop → ImportError
    assert event_loop.loop_name() == "asyncio"
    loop_type = event_loop.run(_loop_type())
    assert loop_type.__module__.startswith("asyncio")


def test_the_echo_server_runs_on_the_services_loop_and_options() -> None:
    """One function for both: the benchmark's echo ceiling moves with the service's set-up."""
    from benchmarks import echo_server
    from service.api import server

    assert echo_server.grpc_server is server.grpc_server is event_loop.grpc_server
    assert echo_server.run is event_loop.run


async def test_without_reuse_port_a_second_server_cannot_take_the_port() -> None:
    first = event_loop.grpc_server(1024)
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    try:
        second = event_loop.grpc_server(1024)
        with pytest.raises(RuntimeError):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        await first.stop(None)

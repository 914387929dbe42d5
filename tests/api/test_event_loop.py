"""The event loop and gRPC server set-up shared by `seqserve serve` and the echo server."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

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


async def test_grpcs_poller_thread_is_made_sched_batch_and_nothing_else_is() -> None:
    """Its wake-ups must not preempt the loop mid-step (`batch_poller`); the loop's own
    thread and the others keep their policy."""
    pollers = [t for t in threading.enumerate() if event_loop.POLLER_THREAD in t.name]
    for t in pollers:  # made so by an earlier server in this process: undo it first
        os.sched_setscheduler(t.native_id, os.SCHED_OTHER, os.sched_param(0))
    server = event_loop.grpc_server(1024)
    pollers = [t for t in threading.enumerate() if event_loop.POLLER_THREAD in t.name]
    assert len(pollers) == 1, [t.name for t in threading.enumerate()]
    assert os.sched_getscheduler(pollers[0].native_id) == os.SCHED_BATCH
    others = [t for t in threading.enumerate() if t not in pollers and t.native_id]
    assert all(os.sched_getscheduler(t.native_id) == os.SCHED_OTHER for t in others)
    await server.stop(None)

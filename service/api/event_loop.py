"""The event loop and gRPC server set-up, shared by `seqserve serve` and the benchmark's echo
server, so the echo ceiling is measured on exactly the service's loop and options.

The loop is uvloop's when it is installed (the `server` extra installs it), else asyncio's.
Measured on one pinned core at 64 streaming sessions, one token per message: see README,
"Where the time goes (per-core)".
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
POLLER_THREAD = "_poll_wrapper"  # in the name of the thread gRPC's asyncio polls its queue on


def loop_name() -> str:
    """The loop `run` uses: "uvloop" when it is importable, else "asyncio"."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh event loop: uvloop's if installed, else asyncio's."""
    if loop_name() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def grpc_server(
    max_message_bytes: int,
    reuse_port: bool = False,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A gRPC asyncio server with the service's options, its poller thread made SCHED_BATCH
    (`batch_poller`)."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            # Requests up to twice the limit reach our code, which refuses those over it with
            # INVALID_ARGUMENT; beyond that gRPC itself answers RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", 2 * max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # One server per port: with SO_REUSEPORT (gRPC's default) a second server on the
            # same port starts and silently takes half the connections. The workers of one
            # `serve --workers N` share it on purpose, under their supervisor's lock.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    batch_poller()
    return server


def batch_poller() -> bool:
    """Put gRPC asyncio's poller thread in SCHED_BATCH: the same share of the CPU, but its wake-ups
    no longer preempt the thread running. gRPC's asyncio polls its completion queue on a thread
    of its own (started with the first server or channel) that takes the GIL for each batch of
    events; on a busy core its wake-ups preempted the event loop in the middle of steps (torch
    lets go of the GIL at each op): at 64 generations on one core the loop's thread was switched
    out involuntarily 77 times a step, 6 with this. Measured on one pinned core, side by side
    (docs/per-core-passes.md, "Twentieth pass"): 64 generations +12–21% tokens/s, 64 streams between
    none and +23% by the hour, the bare echo server faster too. False where there is no such thread
    or no SCHED_BATCH (not Linux): nothing changes then."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    done = False
    for thread in threading.enumerate():
        if POLLER_THREAD in thread.name and thread.native_id is not None:
            try:
                os.sched_setscheduler(thread.native_id, os.SCHED_BATCH, os.sched_param(0))
                done = True
            except OSError as exc:  # a policy this container may not set
                log.info("gRPC's poller thread left as it was: %s", exc)
    return done

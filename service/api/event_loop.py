"""The event loop and gRPC server set-up, shared by `seqserve serve` and the benchmark's echo
server, so the echo ceiling is measured on exactly the service's loop and options.

The loop is uvloop's when it is installed (the `server` extra installs it), else asyncio's.
Measured on one pinned core at 64 streaming sessions, one token per message: see README,
"Where the time goes (per-core)".
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import grpc

T = TypeVar("T")


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
    """A gRPC asyncio server with the service's options."""
    return grpc.aio.server(
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

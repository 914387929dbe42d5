"""Readiness does not follow the model store: a store folder renamed away while the server runs
leaves health SERVING and `/readyz` 200, since the versions loaded are in memory and every
session on them goes on; only new sessions are refused until the store is back. The store
watcher says so in the log, and once it is back new sessions are made again."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.server import SeqServeServer
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from tests.polling import until

from .conftest import make_settings
from .test_health import SESSION_SERVICE, _check, _statuses

SERVING = health_pb2.HealthCheckResponse.SERVING
POLL_SECONDS = 0.2


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Until a log line says `text` (the store watcher's poll, every POLL_SECONDS)."""
    await until(
        lambda: any(text in r.getMessage() for r in caplog.records),
        10,
        f"a log line saying {text!r}",
        interval=POLL_SECONDS / 2,
    )


async def test_a_store_renamed_away_leaves_the_server_ready_for_its_sessions(
    store_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(store_root, tmp_path, server={"metrics_port": 0})
    settings = settings.model_copy(update={"registry_poll_seconds": POLL_SECONDS})
    server = SeqServeServer(settings)
    await server.start()
    caplog.set_level(logging.INFO, logger="service.engine.store_watcher")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            made = await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
            sid = made.session.session_id
            away = store_root.with_name("store.away")
            store_root.rename(away)  # a mount lost, a release folder moved
            await _logged(caplog, "tok: new sessions cannot be served: model 'tok' is gone")

            # Ready, on every count: the session's version is in memory, and it goes on.
            assert await _check(health, "") == SERVING
            assert await _check(health, SESSION_SERVICE) == SERVING
            assert await _statuses(server) == (200, 200)
            assert server.ready()
            step = await stub.Step(pb.StepRequest(session_id=sid, input=types.Input(text="ab")))
            assert step.position == 2
            child = await stub.ForkSession(pb.ForkSessionRequest(session_id=sid))
            assert child.session.position == 2
            assert server.engine.versions.find("tok", 1) is not None  # still loaded
            # Only a new session, which needs the store to resolve its version, is refused.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
            assert refused.value.details() == (
                "model 'tok' not found; available: none (the model store is empty or missing)"
            )  # where the store is on the server is not the client's to read

            away.rename(store_root)  # back
            await _logged(caplog, "tok: fine again")
            again = await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
            assert again.session.version == 1
            assert await _statuses(server) == (200, 200)
            assert await _check(health, "") == SERVING
    finally:
        await server.stop()


async def test_a_store_that_cannot_be_read_is_logged_once_and_the_server_stays_ready(
    store_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's path now a file (as a folder it may not list: the tests run as root, whom
    permissions do not stop): new sessions are refused, the watcher says so once, not at every
    poll (each poll failed with a traceback before), unloads nothing, and says when it is back."""
    settings = make_settings(store_root, tmp_path, server={"metrics_port": 0})
    settings = settings.model_copy(update={"registry_poll_seconds": POLL_SECONDS})
    server = SeqServeServer(settings)
    await server.start()
    caplog.set_level(logging.INFO)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            made = await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
            away = store_root.with_name("store.away")
            store_root.rename(away)
            store_root.write_text("not a folder")
            await _logged(caplog, "the model store: new sessions cannot be served")
            await asyncio.sleep(POLL_SECONDS * 5)  # polls go on
            problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert [r.getMessage() for r in problems] == [
                f"the model store: new sessions cannot be served: the model store {store_root} "
                "is not a readable folder: Not a directory"
            ]
            assert problems[0].exc_info is None
            assert server.ready() and await _statuses(server) == (200, 200)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details() == (
                "the model store is not a readable folder: Not a directory"
            )
            step = await stub.Step(
                pb.StepRequest(session_id=made.session.session_id, input=types.Input(text="a"))
            )
            assert step.position == 1
            served = {(v.name, v.version) for v in server.engine.versions.served()}
            assert served == {("tok", 1), ("frames", 1)}  # nothing unloaded

            store_root.unlink()
            away.rename(store_root)
            await _logged(caplog, "the model store: fine again")
            await stub.CreateSession(pb.CreateSessionRequest(model="frames"))
    finally:
        await server.stop()

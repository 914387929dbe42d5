"""The standard health service (grpc.health.v1.Health) over a real channel: Check, Watch across
`listen()` / `open()` / `stop()`, List, and a channel that does client-side health checking.
SessionService refuses with UNAVAILABLE until the server is open; no health call counts as
INTERNAL in the RPC metric. Readiness: the versions new sessions will ask for load before
health says SERVING, and the metrics port's /healthz, /readyz (and 404 elsewhere) follow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.server import LIVENESS, SeqServeServer
from service.errors import InvalidArgument
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.registry.store import ModelStore

from .conftest import TOKEN_CONFIG, make_settings, publish_random
from .support import expect_status, recorded_rpcs, rpc_counts

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SESSION_SERVICE = "seqserve.v1.SessionService"
REGISTRY_SERVICE = "seqserve.v1.ModelRegistry"
TIMEOUT = 10.0  # seconds: every wait here is bounded by this

# What a load-balancing client would configure: round_robin, with the subchannel used only
# while the server's overall ("") health is SERVING, learned through Watch.
HEALTH_CHECKED_OPTIONS = [
    (
        "grpc.service_config",
        json.dumps(
            {
                "loadBalancingConfig": [{"round_robin": {}}],
                "healthCheckConfig": {"serviceName": ""},
            }
        ),
    ),
]


def _target(server: SeqServeServer) -> str:
    return f"127.0.0.1:{server.port}"


async def _next_status(call: Any) -> int:
    """The next status a Watch stream sends (it must send one within TIMEOUT)."""
    message = await asyncio.wait_for(call.read(), TIMEOUT)
    assert message is not grpc.aio.EOF, "the Watch stream ended"
    return int(message.status)


async def _check(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    return int(response.status)


async def test_check_reports_serving_once_started_and_not_found_for_unknown(
    server: SeqServeServer,
) -> None:
    async with grpc.aio.insecure_channel(_target(server)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert await _check(stub, "") == SERVING
        assert await _check(stub, SESSION_SERVICE) == SERVING
        assert await _check(stub, REGISTRY_SERVICE) == SERVING
        await expect_status(
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
            by_grpc=True,  # the standard health servicer's own status
        )
    # An aborted call is recorded once its status is sent: the client can see it first.
    assert await recorded_rpcs(server, "Check", calls=4) == {"OK": 3, "NOT_FOUND": 1}


async def test_watch_follows_listen_open_and_drain(store_root: Path, tmp_path: Path) -> None:
    # A long grace period: stop() must return because the Watch ends, not because it expired.
    grace = 30.0
    server = SeqServeServer(make_settings(store_root, tmp_path, server={"grace_seconds": grace}))
    stopping: asyncio.Task[None] | None = None
    watch: Any = None
    await server.listen()
    try:
        async with grpc.aio.insecure_channel(_target(server)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            sessions = pb_grpc.SessionServiceStub(channel)
            registry = reg_grpc.ModelRegistryStub(channel)

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert await _next_status(watch) == NOT_SERVING
            assert await _check(health, SESSION_SERVICE) == NOT_SERVING
            assert await _check(health, REGISTRY_SERVICE) == NOT_SERVING
            assert await _check(health, LIVENESS) == SERVING  # alive while starting

            # Listening but not open: our services refuse, and never reach the engine.
            await expect_status(
                sessions.CreateSession(pb.CreateSessionRequest(model="tok"), timeout=TIMEOUT),
                grpc.StatusCode.UNAVAILABLE,
                "server is starting",
                reason="NOT_READY",
            )
            await expect_status(
                registry.ListModels(reg_pb.ListModelsRequest(), timeout=TIMEOUT),
                grpc.StatusCode.UNAVAILABLE,
                "server is starting",
                reason="NOT_READY",
            )
            assert not list(server.engine.sessions)
            assert await recorded_rpcs(server, "CreateSession") == {"UNAVAILABLE": 1}

            await asyncio.wait_for(server.open(), TIMEOUT)
            assert await _next_status(watch) == SERVING
            assert await _check(health, SESSION_SERVICE) == SERVING
            created = await sessions.CreateSession(
                pb.CreateSessionRequest(model="tok"), timeout=TIMEOUT
            )
            assert created.session.session_id

            # Draining: NOT_SERVING reaches the watcher while in-flight calls may still finish.
            started = time.monotonic()
            stopping = asyncio.create_task(server.stop())
            assert await _next_status(watch) == NOT_SERVING
            watch.cancel()
            await asyncio.wait_for(asyncio.shield(stopping), TIMEOUT)
            assert time.monotonic() - started < grace
    finally:
        if watch is not None:
            watch.cancel()
        if stopping is None:
            await server.stop()
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stopping, grace + TIMEOUT)
    counts = rpc_counts(server, "Watch")
    assert counts and "INTERNAL" not in counts and "UNIMPLEMENTED" not in counts, counts


async def test_list_is_unimplemented_not_internal(server: SeqServeServer) -> None:
    async with grpc.aio.insecure_channel(_target(server)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await expect_status(
            stub.List(health_pb2.HealthListRequest(), timeout=TIMEOUT),
            grpc.StatusCode.UNIMPLEMENTED,
            reason="UNIMPLEMENTED",
        )
    assert await recorded_rpcs(server, "List") == {"UNIMPLEMENTED": 1}  # recorded after the reply


async def test_a_client_side_health_checked_channel_connects_and_calls(
    server: SeqServeServer,
) -> None:
    async with grpc.aio.insecure_channel(
        _target(server), options=HEALTH_CHECKED_OPTIONS
    ) as channel:
        await asyncio.wait_for(channel.channel_ready(), TIMEOUT)
        sessions = pb_grpc.SessionServiceStub(channel)
        created = await sessions.CreateSession(
            pb.CreateSessionRequest(model="tok", seed=3), timeout=TIMEOUT
        )
        assert created.session.model == "tok" and created.session.seed == 3
        assert await _check(health_pb2_grpc.HealthStub(channel), "") == SERVING
    # The channel's health check is a Watch that ends when the channel closes.
    watch = await recorded_rpcs(server, "Watch")
    assert "INTERNAL" not in watch and "UNIMPLEMENTED" not in watch, watch
    assert rpc_counts(server, "Check") == {"OK": 1}
    assert rpc_counts(server, "CreateSession") == {"OK": 1}


async def test_a_health_checked_channel_waits_for_open(store_root: Path, tmp_path: Path) -> None:
    server = SeqServeServer(make_settings(store_root, tmp_path))
    await server.listen()
    try:
        async with grpc.aio.insecure_channel(
            _target(server), options=HEALTH_CHECKED_OPTIONS
        ) as channel:
            # NOT_SERVING: the client does not use the connection (a short, bounded look).
            ready = asyncio.ensure_future(channel.channel_ready())
            done, _ = await asyncio.wait({ready}, timeout=1.0)
            assert not done, "the channel became ready while the server was NOT_SERVING"
            await asyncio.wait_for(server.open(), TIMEOUT)
            await asyncio.wait_for(ready, TIMEOUT)
            sessions = pb_grpc.SessionServiceStub(channel)
            created = await sessions.CreateSession(
                pb.CreateSessionRequest(model="tok"), timeout=TIMEOUT
            )
            assert created.session.session_id
    finally:
        await server.stop()


async def test_stop_before_open_leaves_the_spill_tier_alone(
    store_root: Path, tmp_path: Path
) -> None:
    server = SeqServeServer(make_settings(store_root, tmp_path))
    await server.listen()
    await asyncio.wait_for(server.stop(), TIMEOUT)
    # The engine never started, so it neither ran nor wrote a clean-stop marker.
    assert not (tmp_path / "spill" / ".stopped_at").exists()


# ---- readiness: start-up loading, /healthz, /readyz ---------------------------------------


def _http_status(port: int, path: str) -> int:
    """The status the metrics port answers for `path` (blocking; run in a thread)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def _statuses(server: SeqServeServer) -> tuple[int, int]:
    """(/healthz, /readyz) as the metrics port answers them now."""
    port = server.metrics_port
    return (
        await asyncio.to_thread(_http_status, port, "/healthz"),
        await asyncio.to_thread(_http_status, port, "/readyz"),
    )


def _gate_loads(server: SeqServeServer) -> tuple[asyncio.Event, list[tuple[str, int]]]:
    """Hold every model load until the returned event is set (a slow disk, deterministically);
    the list records what started loading. Everything else is the real server."""
    release, started = asyncio.Event(), []
    loader = server.engine.versions._loader
    load = loader.load

    async def held(name: str, version: int) -> Any:
        started.append((name, version))
        await release.wait()
        return await load(name, version)

    loader.load = held  # type: ignore[method-assign]
    return release, started


async def test_ready_only_once_aliased_and_preloaded_versions_are_loaded(
    store_root: Path, tmp_path: Path
) -> None:
    """tok has versions 1-4: `production` on 1, `staging` on 2, 3 named by engine.preload, 4
    neither. Until 1, 2, 3 and frames:1 are loaded, health is NOT_SERVING and /readyz 503;
    then SERVING and 200. While draining: NOT_SERVING and 503, /healthz still 200."""
    store = ModelStore(store_root)
    for seed in (3, 4, 5):
        publish_random(store, "tok", TOKEN_CONFIG, seed=seed)
    store.set_alias("tok", "production", 1)
    store.set_alias("tok", "staging", 2)
    settings = make_settings(
        store_root, tmp_path, server={"metrics_port": 0, "grace_seconds": 30.0}, preload=["tok:3"]
    )
    server = SeqServeServer(settings)
    release, started = _gate_loads(server)
    await server.listen()
    stopping: asyncio.Task[None] | None = None
    try:
        port = server.metrics_port
        assert await _statuses(server) == (200, 503)
        for path in ("/", "/metrics/", "/ready", "/favicon.ico"):
            assert await asyncio.to_thread(_http_status, port, path) == 404, path
        assert await asyncio.to_thread(_http_status, port, "/metrics") == 200
        async with grpc.aio.insecure_channel(_target(server)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            opening = asyncio.create_task(server.open())
            deadline = time.monotonic() + TIMEOUT
            while not started:  # the first load has begun and is held
                assert time.monotonic() < deadline and not opening.done()
                await asyncio.sleep(0.01)
            assert await _check(health, "") == NOT_SERVING
            assert await _check(health, SESSION_SERVICE) == NOT_SERVING
            assert await _statuses(server) == (200, 503)

            release.set()
            await asyncio.wait_for(opening, TIMEOUT)
            assert sorted(started) == [("frames", 1), ("tok", 1), ("tok", 2), ("tok", 3)]
            assert await _check(health, "") == SERVING
            assert await _statuses(server) == (200, 200)
            registry = reg_grpc.ModelRegistryStub(channel)
            detail = await registry.GetModel(reg_pb.GetModelRequest(name="tok"), timeout=TIMEOUT)
            assert {v.version: v.loaded for v in detail.model.versions} == {
                1: True, 2: True, 3: True, 4: False
            }  # fmt: skip

            # An open stream holds the drain (up to the 30 s grace) while we look.
            stream = pb_grpc.SessionServiceStub(channel).Stream(timeout=60)
            await stream.write(pb.StreamRequest())
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert await _next_status(watch) == SERVING
            stopping = asyncio.create_task(server.stop())
            assert await _next_status(watch) == NOT_SERVING
            watch.cancel()
            assert await _statuses(server) == (200, 503)
            assert not stopping.done()
            stream.cancel()
    finally:
        release.set()
        if stopping is None:
            await server.stop()
        else:
            await asyncio.wait_for(stopping, TIMEOUT)


async def test_a_broken_aliased_version_does_not_block_readiness(
    store_root: Path, tmp_path: Path
) -> None:
    """`staging` points at a version whose weights fail their digest: it is skipped (the rest
    still serve) and the server becomes ready."""
    store = ModelStore(store_root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=3)
    store.set_alias("tok", "production", 1)
    store.set_alias("tok", "staging", 2)
    weights = store_root / "tok" / "2" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    server = SeqServeServer(make_settings(store_root, tmp_path, server={"metrics_port": 0}))
    try:
        await asyncio.wait_for(server.start(), TIMEOUT)
        assert await _statuses(server) == (200, 200)
        loaded = {(v.name, v.version) for v in server.engine.versions.served()}
        assert loaded == {("tok", 1), ("frames", 1)}
    finally:
        await server.stop()


async def test_a_preload_naming_nothing_in_the_store_refuses_to_start(
    store_root: Path, tmp_path: Path
) -> None:
    server = SeqServeServer(make_settings(store_root, tmp_path, preload=["tok:canary"]))
    with pytest.raises(InvalidArgument, match=r"engine.preload: 'tok:canary': .*canary"):
        await asyncio.wait_for(server.start(), TIMEOUT)
    await server.stop()


async def test_a_preload_naming_a_version_that_is_refused_skips_it(
    store_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version that is there but unusable (its weights gone) is logged and skipped, as an
    aliased one is, not a traceback at start."""
    store = ModelStore(store_root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=3)
    store.set_alias("tok", "production", 1)
    (store_root / "tok" / "2" / "weights.safetensors").unlink()
    server = SeqServeServer(make_settings(store_root, tmp_path, preload=["tok:2"]))
    try:
        await asyncio.wait_for(server.start(), TIMEOUT)
        loaded = {(v.name, v.version) for v in server.engine.versions.served()}
        assert ("tok", 1) in loaded and ("tok", 2) not in loaded
        assert "not preloading tok:2" in caplog.text
    finally:
        await server.stop()

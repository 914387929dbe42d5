"""Setting up and tearing down the load test's sessions (outside the measured window)."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc

from service.client.client import route_metadata
from service.loadtest.config import LoadConfig
from service.loadtest.drivers import ClientSession
from service.loadtest.recorder import LoadRecorder
from service.loadtest.target import ModelInfo
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.sessions.session import ROUTE_HEADER

_CONCURRENCY = 32  # set-up calls in flight at once
_HISTORY_CHUNK = 1024  # inputs per prefill call, well under the server's chunk limit
_CLOSE_RETRIES = 5  # a session still finishing a cancelled generation answers ABORTED

T = TypeVar("T")


async def _bounded(calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def create_sessions(
    stub: pb_grpc.SessionServiceStub,
    config: LoadConfig,
    model: ModelInfo,
    recorder: LoadRecorder,
) -> list[ClientSession]:
    """Create `config.sessions` sessions pinned to `model.version`, prefill their history, and
    add `config.invalid_sessions` ids the server never issued. Failures are recorded."""
    master = random.Random(config.seed)
    seeds = [master.getrandbits(63) for _ in range(config.sessions + config.invalid_sessions)]
    run = secrets.token_urlsafe(4)  # this run's routing keys: one per Stream group

    async def create(i: int) -> ClientSession | None:
        request = pb.CreateSessionRequest(
            model=model.name, version=str(model.version), seed=seeds[i]
        )
        group = config.sessions if config.client_mux else config.multiplex  # per routing key
        route = ((ROUTE_HEADER, f"lt{run}-{i // max(1, group)}"),)
        try:
            response = await stub.CreateSession(request, metadata=route)
        except grpc.aio.AioRpcError as exc:
            recorder.error("create", exc.code().name, exc.details() or "", time.perf_counter())
            return None
        session = ClientSession(response.session.session_id, random.Random(seeds[i]))
        if config.history and not await _prefill(stub, session, config.history, model, recorder):
            return None
        return session

    created = await _bounded(
        [lambda i=i: create(i) for i in range(config.sessions)]  # type: ignore[misc]
    )
    sessions = [s for s in created if s is not None]
    sessions += [
        ClientSession(f"loadtest-invalid-{i}", random.Random(seeds[config.sessions + i]), False)
        for i in range(config.invalid_sessions)
    ]
    return sessions


async def _prefill(
    stub: pb_grpc.SessionServiceStub,
    session: ClientSession,
    history: int,
    model: ModelInfo,
    recorder: LoadRecorder,
) -> bool:
    skip = types.PredictionOptions(skip=True)
    left = history
    while left:
        n = min(left, _HISTORY_CHUNK)
        request = pb.StepRequest(
            session_id=session.session_id,
            request_id="history",
            input=model.random_input(session.rng, n),
            options=skip,
        )
        try:
            await stub.Step(request, metadata=route_metadata(session.session_id))
        except grpc.aio.AioRpcError as exc:
            recorder.error("history", exc.code().name, exc.details() or "", time.perf_counter())
            return False
        left -= n
    return True


async def close_sessions(
    stub: pb_grpc.SessionServiceStub, sessions: list[ClientSession], recorder: LoadRecorder
) -> None:
    async def close(session: ClientSession) -> None:
        request = pb.CloseSessionRequest(session_id=session.session_id)
        for attempt in range(_CLOSE_RETRIES):
            try:
                await stub.CloseSession(request, metadata=route_metadata(session.session_id))
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ABORTED and attempt + 1 < _CLOSE_RETRIES:
                    await asyncio.sleep(0.02 * (attempt + 1))
                    continue
                recorder.error("close", exc.code().name, exc.details() or "", time.perf_counter())
                return

    await _bounded(
        [lambda s=s: close(s) for s in sessions if s.created]  # type: ignore[misc]
    )

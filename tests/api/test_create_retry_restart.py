"""A CreateSession retry must repeat its request, after a crash too: a real `seqserve serve`
process, SIGKILLed after a create without a prefix, is started again; the retry of that create
(its request id) with a prefix is refused INVALID_ARGUMENT and the session stays at position 0;
the same retry without a prefix gets the session the first call made. Likewise a retry that
drops the prefix its first call carried."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from tests.polling import until

from .support import expect_status, tokens
from .test_lifecycle_restart import ServerProcess, server_process  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


async def test_a_retry_adding_a_prefix_is_refused_after_sigkill(
    server_process: ServerProcess,  # noqa: F811
) -> None:
    first = pb.CreateSessionRequest(model="tok", request_id="c1")
    async with _made_then_killed(server_process, first) as (stub, made):
        sid = made.session.session_id
        retry = pb.CreateSessionRequest(model="tok", request_id="c1", prefix=tokens(1, 2))
        await expect_status(
            stub.CreateSession(retry, timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "was used for a create without a prefix",
        )
        got = await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        assert got.session.position == 0  # nothing applied
        again = await stub.CreateSession(first, timeout=10)
        assert again.session.session_id == sid


async def test_a_retry_dropping_its_prefix_is_refused_after_sigkill(
    server_process: ServerProcess,  # noqa: F811
) -> None:
    first = pb.CreateSessionRequest(model="tok", request_id="c1", prefix=tokens(1, 2))
    async with _made_then_killed(server_process, first) as (stub, made):
        await expect_status(
            stub.CreateSession(pb.CreateSessionRequest(model="tok", request_id="c1"), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "was used for a create with a prefix",
        )
        again = await stub.CreateSession(first, timeout=10)
        assert again.session.session_id == made.session.session_id
        assert again.session.position == 2  # the prefix, applied once
        assert again.prediction == made.prediction  # the first call's outcome


@contextlib.asynccontextmanager
async def _made_then_killed(
    server_process: ServerProcess,  # noqa: F811
    first: pb.CreateSessionRequest,
) -> AsyncIterator[tuple[pb_grpc.SessionServiceStub, pb.CreateSessionResponse]]:
    """`first` made on a real server, which is then SIGKILLed and started again: a stub on
    the restarted server once it answers for the session, and what `first` answered."""
    await server_process.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_process.port}") as channel:
        made = await pb_grpc.SessionServiceStub(channel).CreateSession(first)
    server_process.kill()
    await server_process.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_process.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        await _recovered(stub, made.session.session_id)
        yield stub, made


async def _recovered(stub: pb_grpc.SessionServiceStub, sid: str) -> None:
    """Until the restarted server answers for `sid` (UNAVAILABLE while it recovers)."""

    async def answers() -> bool:
        try:
            await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    await until(answers, 20, f"the server to answer for {sid}, not UNAVAILABLE", interval=0.1)

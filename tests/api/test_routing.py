"""Routing keys: chosen at creation (the `x-seqserve-route` metadata, or at random), part of
the session id, inherited by forks; the Python client sends the key on every call."""

from __future__ import annotations

import grpc
import pytest

from service.client.client import SeqServeClient, route_metadata
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.sessions.session import ROUTE_HEADER, new_session_id, route_of, valid_route


def test_the_route_is_read_back_from_the_id() -> None:
    assert route_of(new_session_id("user-42")) == "user-42"
    random_a, random_b = route_of(new_session_id()), route_of(new_session_id())
    assert valid_route(random_a) and random_a != random_b
    assert route_of("s_abcdefghijklmnop") == "s_abcdefghijklmnop"  # an id from before keys
    assert not valid_route("") and not valid_route("a.b") and not valid_route("x" * 65)
    assert not valid_route("user-42\n")  # `$` alone would let a trailing newline through


async def test_create_takes_the_key_from_metadata_and_forks_inherit_it(
    client: SeqServeClient,
) -> None:
    stub = client.sessions
    made = await stub.CreateSession(
        pb.CreateSessionRequest(model="tok"), metadata=((ROUTE_HEADER, "gateway-7"),)
    )
    sid = made.session.session_id
    assert sid.startswith("s_gateway-7.") and route_of(sid) == "gateway-7"
    child = await stub.ForkSession(
        pb.ForkSessionRequest(session_id=sid), metadata=route_metadata(sid)
    )
    assert route_of(child.session.session_id) == "gateway-7"
    keyless = await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
    assert valid_route(route_of(keyless.session.session_id))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateSession(
            pb.CreateSessionRequest(model="tok"), metadata=((ROUTE_HEADER, "no/slashes"),)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ROUTE_HEADER in (err.value.details() or "")


class _Recording(pb_grpc.SessionServiceServicer):
    """Answers every session call with a canned reply and records each call's routing key."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def _see(self, method: str, context) -> None:  # type: ignore[no-untyped-def]
        self.seen.append((method, dict(context.invocation_metadata()).get(ROUTE_HEADER, "")))

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        self._see("CreateSession", context)
        route = dict(context.invocation_metadata())[ROUTE_HEADER]
        return pb.CreateSessionResponse(session=types.Session(session_id=f"s_{route}.abc"))

    async def ForkSession(self, request, context):  # type: ignore[no-untyped-def]
        self._see("ForkSession", context)
        route = route_of(request.session_id)
        return pb.ForkSessionResponse(session=types.Session(session_id=f"s_{route}.def"))

    async def Step(self, request, context):  # type: ignore[no-untyped-def]
        self._see("Step", context)
        return pb.StepResponse(position=request.expected_position + 1)

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        self._see("GetSession", context)
        return pb.GetSessionResponse(session=types.Session(session_id=request.session_id))

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        self._see("CloseSession", context)
        return pb.CloseSessionResponse(session=types.Session(session_id=request.session_id))

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        self._see("Generate", context)
        return
        yield


async def test_the_client_sends_the_key_on_every_call() -> None:
    recording = _Recording()
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(recording, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with SeqServeClient(
            f"127.0.0.1:{port}", route_key="tenant-3", multiplex=False
        ) as client:  # feeds by Step (multiplexed feeds: tests/client/test_multiplex.py)
            session = await client.create_session("tok")
            await session.feed(tokens=[1, 2])
            _ = [piece async for piece in session.generate(max_tokens=2)]
            await session.refresh()
            child = await session.fork()
            await child.close()
            other = await client.create_session("tok", route_key="user-9")
            await other.feed(tokens=[3])
    finally:
        await server.stop(None)
    calls = ["CreateSession", "Step", "Generate", "GetSession", "ForkSession", "CloseSession"]
    assert recording.seen[: len(calls)] == [(m, "tenant-3") for m in calls]
    assert recording.seen[len(calls) :] == [("CreateSession", "user-9"), ("Step", "user-9")]

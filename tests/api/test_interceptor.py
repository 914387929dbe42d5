"""The status details of every error (`service.api.error_status.rich_status`): the reason table
in `service.errors` (one reason per row of DESIGN section 4's table; rows that share a status
have a reason each), and the reasons that split a status, produced over real gRPC (the other
reasons are asserted where `test_errors.py` produces their conditions; every failed call and
in-band error there is checked for a well-formed ErrorInfo by `support.expect_status` and
`support.read_replies`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2

from service import errors
from service.api.interceptor import ErrorMappingInterceptor
from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc

from .conftest import TOKEN_CONFIG, ServerFactory
from .support import (
    check_error_info,
    expect_status,
    item,
    read_replies,
    recorded_rpcs,
    text,
    tokens,
)


async def _create(client: SeqServeClient, model: str = "tok", **fields: object) -> str:
    request = pb.CreateSessionRequest(model=model, **fields)  # type: ignore[arg-type]
    return (await client.sessions.CreateSession(request)).session.session_id


def _step(client: SeqServeClient, sid: str, inp: object):  # type: ignore[no-untyped-def]
    return client.sessions.Step(pb.StepRequest(session_id=sid, input=inp))  # type: ignore[arg-type]


# The ErrorInfo reasons that split a row of the table: DESIGN's conditions, one reason each.
SPLIT_ROWS = {
    "NOT_FOUND": {
        "SESSION_NOT_FOUND",
        "MODEL_NOT_FOUND",
        "VERSION_NOT_FOUND",
        "ALIAS_NOT_FOUND",
        "ROUTE_NOT_FOUND",
    },  # the last: HTTP only
    "FAILED_PRECONDITION": {"SESSION_CLOSED", "VERSION_UNAVAILABLE", "POSITION_MISMATCH"},
    "RESOURCE_EXHAUSTED": {"SESSION_LIMIT", "QUEUE_FULL", "MEMORY_EXHAUSTED", "QUOTA_EXCEEDED"},
    "UNAVAILABLE": {"DRAINING", "NOT_READY", "NOT_DURABLE", "SESSION_MOVED"},
    "DATA_LOSS": {"DIGEST_MISMATCH", "SESSION_LOST"},
}


def test_every_error_class_has_a_reason_of_its_row() -> None:
    """Each class's ErrorInfo reason is one of `REASONS`, under the class's own status; every
    row's reasons are there; a reason names one status only."""
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.SeqServeError):
            assert errors.REASONS[cls.reason] == cls.status, cls
    for code, reasons in SPLIT_ROWS.items():
        assert {r for r, c in errors.REASONS.items() if c.name == code} == reasons
    for code in ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL"):
        assert errors.REASONS[code] == grpc.StatusCode[code]  # one row: the code's own name
    assert errors.REASONS["SESSION_BUSY"] == grpc.StatusCode.ABORTED
    assert errors.QueueFull.reason == "QUEUE_FULL" and errors.PoolExhausted.reason == (
        "MEMORY_EXHAUSTED"
    )
    assert errors.PositionMismatch("m", 3).metadata == {"position": "3"}


async def test_closed_session_and_wrong_position(client: SeqServeClient) -> None:
    sid = await _create(client)
    step = pb.StepRequest(session_id=sid, request_id="r1", input=text("ab"), expected_position=5)
    fp = grpc.StatusCode.FAILED_PRECONDITION
    await expect_status(client.sessions.Step(step), fp, reason="POSITION_MISMATCH")
    call = client.sessions.Stream()  # in-band, the same reason and the position
    wrong = pb.StreamItem(session_id=sid, request_id="r2", input=text("c"), expected_position=9)
    await call.write(pb.StreamRequest(items=[wrong]))
    (reply,) = (await read_replies(call, ["r2"]))["r2"]
    await call.done_writing()
    assert check_error_info(reply.error, "POSITION_MISMATCH")
    info = error_details_pb2.ErrorInfo()
    assert reply.error.details[0].Unpack(info) and info.metadata["position"] == "0"
    await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid))
    await expect_status(_step(client, sid, text("a")), fp, "closed", reason="SESSION_CLOSED")


async def test_state_memory_full_with_nothing_evictable(server_factory: ServerFactory) -> None:
    tok_slot_bytes = 2 * TOKEN_CONFIG.num_layers * TOKEN_CONFIG.hidden_size * 4  # h and c
    srv = await server_factory(
        sessions={"pool_bytes": tok_slot_bytes, "pool_initial_slots": 1, "slot_wait_seconds": 0},
        max_generate_tokens=1_000_000,
    )
    async with await _client_of(srv.port) as client:
        sid = await _create(client, seed=1)
        busy = client.sessions.Generate(
            pb.GenerateRequest(session_id=sid, sampling=make_sampling(max_tokens=1_000_000))
        )
        await busy.read()  # generating: its slot cannot be taken
        try:
            await expect_status(
                client.sessions.CreateSession(pb.CreateSessionRequest(model="tok")),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                reason="MEMORY_EXHAUSTED",
            )
        finally:
            busy.cancel()


async def test_step_queue_full(server_factory: ServerFactory) -> None:
    srv = await server_factory(max_queue=1)
    async with await _client_of(srv.port) as client:
        a, b = await _create(client), await _create(client)
        call = client.sessions.Stream()  # two rows at once, for a queue of one
        await call.write(pb.StreamRequest(items=[item(a, "a", text("x")), item(b, "b", text("y"))]))
        replies = await read_replies(call, ["a", "b"])
        await call.done_writing()
        assert {check_error_info(replies[k][0].error, "QUEUE_FULL") for k in "ab"} == {"QUEUE_FULL"}
        assert "raise SEQSERVE_ENGINE__MAX_QUEUE" in replies["a"][0].error.message


async def _client_of(port: int) -> SeqServeClient:
    return SeqServeClient(f"127.0.0.1:{port}")


async def test_a_method_s_handler_is_wrapped_once_not_once_a_call() -> None:
    """The wrapper around a servicer's handler is built on the method's first call and used
    again; a different handler for the same path (another servicer) gets its own."""
    interceptor = ErrorMappingInterceptor(lambda *_: None, ready=lambda: True)

    async def generate(request: object, context: object) -> AsyncIterator[object]:
        yield request

    handler = grpc.unary_stream_rpc_method_handler(generate)
    other = grpc.unary_stream_rpc_method_handler(generate)
    details = SimpleNamespace(method="/seqserve.v1.SessionService/Generate")

    async def serves(h: grpc.RpcMethodHandler):  # type: ignore[no-untyped-def]
        async def continuation(_details: object) -> grpc.RpcMethodHandler:
            return h

        return await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]

    first = await serves(handler)
    assert first is not handler and first.unary_stream is not generate
    assert await serves(handler) is first
    assert (await serves(other)) is not first
    assert await serves(other) is await serves(other)


class _Relay:
    """A TCP relay to the server that can stop passing on what the client sends (`hold`):
    held, a client's cancel at its own deadline never reaches the server, which then ends the
    call at its deadline. (The server's deadline is the client's plus the time the call's
    headers took to arrive: on a loaded host the client's came first by enough that the
    cancel arrived before the server's, and the Stream counted OK, as a cancelled one does.)"""

    def __init__(self, port: int) -> None:
        self.port = 0
        self._target = port
        self._held = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def hold(self) -> None:
        self._held.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target)
        for pump in (self._pump(client_r, server_w, True), self._pump(server_r, client_w, False)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, held: bool) -> None:
        try:
            while data := await r.read(65536):
                if not (held and self._held.is_set()):
                    w.write(data)
                    await w.drain()
        finally:
            w.close()


async def test_a_deadline_that_runs_out_is_counted_as_such_not_as_a_cancel(
    server_factory: ServerFactory,
) -> None:
    """gRPC cancels the handler both when the client's deadline runs out and when the client
    cancels: the metric told them apart by neither, so a server too slow for its clients'
    deadlines (what SeqserveHighErrorRatio pages on) read as clients going away."""
    # A generation no host finishes before the deadline: one that did (2048 tokens in 0.2 s is
    # 10,000 a second) ended OK on the server, however slowly the client read its tokens.
    server = await server_factory(max_generate_tokens=10_000_000)
    async with (
        _Relay(server.port) as relay,
        grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as held,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.SessionServiceStub(channel)
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model="tok"))).session.session_id
        long = pb.GenerateRequest(session_id=sid, sampling=make_sampling(max_tokens=10_000_000))
        late_call = pb_grpc.SessionServiceStub(held).Generate(long, timeout=0.2)
        await late_call.read()
        # The client's cancel at its own deadline stays with the relay, so the server's deadline
        # ends the call. (It trails the client's by the time the headers took to arrive: on a
        # loaded host the client's cancel came first, and the server rightly saw a cancel.)
        relay.hold()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            while await late_call.read() is not grpc.aio.EOF:
                await asyncio.sleep(0.01)  # a slow reader: the deadline comes first
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await recorded_rpcs(server, "Generate", calls=1)
        gone = stub.Generate(long)
        await gone.read()
        gone.cancel()  # the client goes away
        counts = await recorded_rpcs(server, "Generate", calls=2)
    assert counts == {"DEADLINE_EXCEEDED": 1, "CANCELLED": 1}


async def test_a_stream_whose_deadline_runs_out_is_not_counted_as_ok(
    server_factory: ServerFactory,
) -> None:
    """A Stream's requests simply end when its deadline runs out, and its handler returns as if
    the client had finished: the metric said OK. (A Stream the client cancels still counts as
    OK: gRPC does not tell the handler, see `returned_code_name`.)"""
    server = await server_factory()
    async with (
        _Relay(server.port) as relay,
        grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel,
    ):
        stub = pb_grpc.SessionServiceStub(channel)
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model="tok"))).session.session_id
        quiet: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()

        async def messages() -> AsyncIterator[pb.StreamRequest]:
            while (message := await quiet.get()) is not None:
                yield message

        fed = stub.Stream(messages(), timeout=0.5)  # fed once, then quiet until its deadline
        await quiet.put(pb.StreamRequest(items=[pb.StreamItem(session_id=sid, input=tokens(1))]))
        await fed.read()
        relay.hold()  # the client's cancel at its deadline stays with the relay
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await fed.read()
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        counts = await recorded_rpcs(server, "Stream", calls=1)
        await quiet.put(None)
    assert counts == {"DEADLINE_EXCEEDED": 1}


async def test_a_call_the_stopping_server_ends_is_unavailable_not_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At the end of a shutdown's grace period gRPC raises `_ServerStoppedError` into a
    handler still reading (a Stream's `async for`): counted UNAVAILABLE, no traceback, no
    status sent (the call cannot take one). It was logged as an internal error."""
    from grpc._cython import cygrpc

    from service.api.interceptor import _Observed

    seen: list[tuple[str, str]] = []
    owner = ErrorMappingInterceptor(lambda method, code, *_: seen.append((method, code)))
    context = SimpleNamespace(time_remaining=lambda: None)
    observed = _Observed(owner, "/seqserve.v1.SessionService/Stream", False, context)  # type: ignore[arg-type]
    stopped = cygrpc._ServerStoppedError("Server already stopped.")
    assert await observed.__aexit__(type(stopped), stopped, None) is True
    assert seen == [("Stream", "UNAVAILABLE")]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text

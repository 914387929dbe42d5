"""The client's own behaviour: typed results and `async with` against a real server; retries
and timeouts against a real gRPC server on loopback whose SessionService answers as each test
says (UNAVAILABLE a few times, or nothing for a while), counting the calls it receives; and an
import that pulls in neither torch nor numpy."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from service.api.server import SeqServeServer
from service.client import errors, retry
from service.client.client import ClientSession, SeqServeClient
from service.client.results import ModelInfo, Prediction, SessionInfo, TopToken
from service.client.retry import Pauses, RetryPolicy
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from tests.api.conftest import (  # noqa: F401 - fixtures
    ServerFactory,
    server,
    server_factory,
    store_root,
)

REPO = Path(__file__).resolve().parents[2]

# ---- against the real server ------------------------------------------------------------------


async def test_typed_results_and_async_with(server: SeqServeServer) -> None:  # noqa: F811
    async with SeqServeClient(f"127.0.0.1:{server.port}", timeout=10) as client:
        models = await client.list_models()
        assert all(isinstance(m, ModelInfo) for m in models)
        assert {m.name: m.versions for m in models} == {"frames": [1], "tok": [1]}
        tok = await client.get_model("tok")
        assert tok.default_version == 1 and tok.aliases == {}
        (v1,) = tok.details
        assert (v1.version, v1.status, v1.cell) == (1, "ok", "lstm")
        assert v1.manifest["hidden_size"] == 24 and len(v1.fingerprint) > 8

        async with await client.create_session("tok", seed=4, ttl_seconds=60) as session:
            assert isinstance(session.info, SessionInfo)
            assert (session.info.model, session.info.version, session.info.seed) == ("tok", 1, 4)
            assert session.info.ttl_seconds == 60 and session.info.state == "active"
            pred = await session.feed(text="ab", top_k=3)
            assert isinstance(pred, Prediction) and pred.position == 2 and not pred.values
            assert len(pred.top) == 3 and all(isinstance(t, TopToken) for t in pred.top)
            token_id, prob, _ = pred.top[0]  # still a tuple
            assert 0 <= token_id < 256 and prob == max(t.prob for t in pred.top)
            async with await session.fork() as branch:
                assert branch.info.parent_session_id == session.session_id
                assert branch.info.position == 2
            info = await session.refresh()
            assert info.position == 2 and info.created_at is not None
        # Both were closed on leaving their blocks.
        with pytest.raises(errors.SessionClosedError):
            await (await client.attach(session.session_id)).refresh()
        with pytest.raises(errors.SessionClosedError):
            await (await client.attach(branch.session_id)).refresh()

        series = await client.create_session("frames")
        out = await series.feed(frames=[0.5, -0.5, 1.0])
        assert out.top == [] and len(out.values) == 2
        await series.close()
        assert series.closed
        async with series:  # already closed: leaving does not close again
            pass
    assert client.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN


async def test_closed_on_error_inside_the_block(server: SeqServeServer) -> None:  # noqa: F811
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(RuntimeError):
            async with await client.create_session("tok") as session:
                raise RuntimeError("the app failed")
        assert session.closed
        with pytest.raises(errors.SessionClosedError):
            await session.refresh()


async def test_a_close_waits_for_the_generation_running_on_the_session(
    server_factory: ServerFactory,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One request at a time per session: a close that arrives while a generation runs is
    refused SESSION_BUSY by the server. The client's close waits it out (the retry policy's
    backoff), so leaving `async with` while a generation goes on closes the session instead
    of raising SessionBusyError (masking the block's own exception)."""
    # The close must reach the server while the generation runs, on any host: some 10 tokens
    # had run when it did here, at ~1,000 a second. The first generation must end for the
    # close to apply, so it is finite: 2048 tokens, and the close waits up to 60 s for it (a
    # loaded host may stall for seconds); the second one is stopped by the test, so it need
    # not end by itself.
    srv = await server_factory(max_generate_tokens=10_000_000)
    patient = RetryPolicy(deadline_seconds=60, first_backoff_seconds=0.01, max_backoff_seconds=0.02)
    async with SeqServeClient(f"127.0.0.1:{srv.port}", retry=patient) as client:
        answers: list[grpc.StatusCode] = []  # each CloseSession call's, in order
        close_rpc = client.sessions.CloseSession

        async def counted(request: pb.CloseSessionRequest, **kwargs: object) -> object:
            try:
                reply = await close_rpc(request, **kwargs)
            except grpc.aio.AioRpcError as err:
                answers.append(err.code())
                raise
            answers.append(grpc.StatusCode.OK)
            return reply

        monkeypatch.setattr(client.sessions, "CloseSession", counted)
        session = await client.create_session("tok", seed=3)
        pieces = session.generate(max_tokens=2048, temperature=1.0)
        first = await anext(pieces)
        rest = asyncio.ensure_future(_drain(pieces))  # the generation goes on meanwhile
        await session.close()  # refused while it runs (at least once), then applied
        assert session.closed
        # The generation ended whole before the close applied; its last tokens may still be
        # on their way to this client (the server is done with them, the reader need not be).
        assert 1 + len(await rest) == 2048 and first.text is not None
        assert answers[0] == grpc.StatusCode.ABORTED and answers[-1] == grpc.StatusCode.OK
        with pytest.raises(errors.SessionClosedError):
            await session.refresh()
        # What the server said meanwhile: the same close, without waiting, is refused.
        other = await client.create_session("tok", seed=3)
        running = other.generate(max_tokens=10_000_000, temperature=1.0)
        await anext(running)
        request = pb.CloseSessionRequest(session_id=other.session_id)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.sessions.CloseSession(request, metadata=other.metadata)
        assert errors.error_from_rpc(refused.value).reason == "SESSION_BUSY"
        await running.aclose()  # its call cancelled: the server stops at its next step
        await other.close()


@pytest.mark.parametrize("multiplex", [True, False])
async def test_a_request_right_after_breaking_out_of_a_generation_goes_on_from_its_end(
    server: SeqServeServer,  # noqa: F811
    multiplex: bool,
) -> None:
    """`break` out of `generate`, then at once a feed, a generation or a fork on the same
    handle: asyncio closes the broken-off generator (and cancels its call) only later, so the
    request used to go out at the position last yielded while the server still generated
    (SESSION_BUSY, or a position mismatch). It stops that call, waits for the session, and
    goes on from where the generation ended."""
    async with SeqServeClient(
        f"127.0.0.1:{server.port}", retry=FAST, multiplex=multiplex
    ) as client:
        for then in ("feed", "generate", "fork"):
            session = await client.create_session("tok", seed=3)
            async for piece in session.generate(max_tokens=2000, temperature=1.0):
                if piece.position >= 5:
                    break
            if then == "feed":
                await session.feed(tokens=[1])
            elif then == "generate":
                assert len([p async for p in session.generate(max_tokens=3)]) == 3
            else:
                child = await session.fork()
                assert child.position == (await session.refresh()).position
            assert session.position == (await session.refresh()).position > 5
            await session.close()


@pytest.mark.parametrize("multiplex", [True, False])
async def test_calls_waiting_to_retry_when_the_client_closes_end_as_those_in_flight_do(
    server_factory: ServerFactory,  # noqa: F811
    multiplex: bool,
) -> None:
    """The server gone, each call fails UNAVAILABLE and waits in its retry backoff; the client
    closes. They used to wait out the backoff and retry on the closed channel: gRPC's
    `UsageError` ("Channel is closed"). They end at once with `asyncio.CancelledError`, as a
    call in flight does (`test_a_call_in_flight_when_the_client_closes_is_cancelled`)."""
    srv = await server_factory()
    slow = RetryPolicy(first_backoff_seconds=30.0, max_backoff_seconds=30.0)  # pauses of 15-45 s
    client = SeqServeClient(f"127.0.0.1:{srv.port}", retry=slow, multiplex=multiplex)
    feeding, generating, forking = [await client.create_session("tok", seed=1) for _ in range(3)]
    await srv.stop()  # nothing listens on its port any more
    calls = [
        asyncio.ensure_future(feeding.feed(tokens=[1])),
        asyncio.ensure_future(_drain(generating.generate(max_tokens=2))),
        asyncio.ensure_future(forking.fork()),
        asyncio.ensure_future(client.create_session("tok")),
    ]
    await asyncio.sleep(0.5)  # each has failed once, and waits to retry
    assert not any(call.done() for call in calls)
    closing = time.monotonic()
    await client.close()
    for call in calls:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 10)
    assert time.monotonic() - closing < 10.0  # at the close, not after the backoff (15-45 s)


async def test_a_pause_that_ends_as_the_client_closes_makes_no_more_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race the test above lost on a busy host (fork: UsageError, "Channel is closed"): a
    pause's time is up (its timer fired, the call not yet resumed) when the client closes.
    Ending the pause then did nothing, and the call went on to retry on the closed channel. It
    ends with `asyncio.CancelledError` as the others do, without another attempt."""
    pauses = Pauses()
    woken = retry._wake

    def wake_then_close(done: asyncio.Future[None]) -> None:
        woken(done)  # the pause's time is up...
        pauses.close()  # ...and the client closes before the call goes on

    monkeypatch.setattr(retry, "_wake", wake_then_close)
    attempts = 0

    async def attempt(_left: float | None) -> None:
        nonlocal attempts
        attempts += 1
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
        )

    policy = RetryPolicy(first_backoff_seconds=0.01, max_backoff_seconds=0.01)
    with pytest.raises(asyncio.CancelledError):
        await policy.run(attempt, pauses=pauses)
    assert attempts == 1


async def _drain(pieces: AsyncIterator[object]) -> list[object]:
    return [piece async for piece in pieces]


def test_importing_the_client_loads_no_torch_or_numpy() -> None:
    code = (
        "import sys, service.client, service.client.client, service.client.errors\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules)\n"
        "engine = sorted(m for m in sys.modules if m.startswith(('service.engine', "
        "'service.runtime', 'service.models')))\n"
        "print(heavy, engine)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr


# ---- against a scripted SessionService -----------------------------------------------------------


class Scripted(pb_grpc.SessionServiceServicer):
    """Fails the first `failures` calls of each method with `code`; `stall` seconds before
    answering Step. Counts the calls it receives, by method."""

    def __init__(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures = failures
        self.code = code
        self.stall = 0.0
        self.calls: dict[str, int] = {}

    async def _count(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            await context.abort(self.code, f"{method}: not now")

    @staticmethod
    def _session(session_id: str = "s_k.one") -> types.Session:
        return types.Session(session_id=session_id, model="m", version=1)

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        await self._count("CreateSession", context)
        return pb.CreateSessionResponse(session=self._session())

    async def ForkSession(self, request, context):  # type: ignore[no-untyped-def]
        await self._count("ForkSession", context)
        return pb.ForkSessionResponse(session=self._session("s_k.two"))

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        await self._count("GetSession", context)
        return pb.GetSessionResponse(session=self._session(request.session_id))

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        await self._count("CloseSession", context)
        return pb.CloseSessionResponse(session=self._session(request.session_id))

    async def Step(self, request, context):  # type: ignore[no-untyped-def]
        await self._count("Step", context)
        await asyncio.sleep(self.stall)
        return pb.StepResponse(
            session_id=request.session_id, position=1, prediction=types.Prediction(position=1)
        )

    async def Stream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        """A multiplexing client's feeds: each item counted as a "StreamItem" call, refused
        in-band (as the server does) or answered like Step, each on its own (as the server's
        items on different sessions are: one stalled item holds up no later one)."""
        replies: asyncio.Queue[pb.StreamReply] = asyncio.Queue()
        answering: set[asyncio.Task[None]] = set()

        async def answer(item: pb.StreamItem, n: int) -> None:
            reply = pb.StreamReply(session_id=item.session_id, request_id=item.request_id)
            if n <= self.failures:
                reply.error.code, reply.error.message = self.code.value[0], "item: not now"
            else:
                await asyncio.sleep(self.stall)
                reply.position = 1
                reply.prediction.position = 1
            replies.put_nowait(reply)

        async def read() -> None:
            async for request in request_iterator:
                for item in request.items:
                    self.calls["StreamItem"] = n = self.calls.get("StreamItem", 0) + 1
                    task = asyncio.create_task(answer(item, n))
                    answering.add(task)
                    task.add_done_callback(answering.discard)

        reading = asyncio.create_task(read())
        try:
            while not (reading.done() and not answering and replies.empty()):
                waiting = asyncio.ensure_future(replies.get())
                await asyncio.wait({waiting, reading, *answering}, return_when="FIRST_COMPLETED")
                if not waiting.done():
                    waiting.cancel()
                    continue
                yield pb.StreamResponse(replies=[waiting.result()])
        finally:
            for task in (reading, *answering):
                task.cancel()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    scripted_server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(servicer, scripted_server)
    port = scripted_server.add_insecure_port("127.0.0.1:0")
    await scripted_server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await scripted_server.stop(0)


FAST = RetryPolicy(deadline_seconds=5, first_backoff_seconds=0.01, max_backoff_seconds=0.02)


@pytest.mark.parametrize("multiplex", [False, True])
async def test_unavailable_is_retried_once_per_attempt_for_safe_calls(
    scripted: tuple[Scripted, str], multiplex: bool
) -> None:
    servicer, target = scripted
    servicer.failures = 2
    async with SeqServeClient(target, retry=FAST, multiplex=multiplex) as client:
        session = await client.create_session("m")
        await session.feed(tokens=[1])
        await session.fork()
        await session.refresh()
    # Two refusals and one success each: one retry layer (the channel retries nothing, or the
    # server would have counted more).
    feed = "StreamItem" if multiplex else "Step"
    assert servicer.calls == {"CreateSession": 3, feed: 3, "ForkSession": 3, "GetSession": 3}


async def test_close_is_not_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures = 1
    async with SeqServeClient(target, retry=FAST) as client:
        session = await client.create_session("m")
        with pytest.raises(errors.UnavailableError) as err:
            await session.close()
        assert err.value.reason == "" and "not now" in err.value.message  # no ErrorInfo here
        assert not session.closed
    assert servicer.calls["CloseSession"] == 1


async def test_other_codes_are_not_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures, servicer.code = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    async with SeqServeClient(target, retry=FAST) as client:
        with pytest.raises(errors.ResourceExhaustedError):
            await client.create_session("m")
    assert servicer.calls == {"CreateSession": 1}


async def test_retries_stop_at_the_retry_deadline(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures = 10**6
    # 3 s of retries: a busy host's stall in the first attempt still leaves time for more.
    policy = RetryPolicy(deadline_seconds=3.0, first_backoff_seconds=0.01, max_backoff_seconds=0.05)
    async with SeqServeClient(target, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(errors.UnavailableError):
            await client.create_session("m")
        assert time.monotonic() - started < 10.0  # its 3 s, not the default 30 s (nor for ever)
    assert servicer.calls["CreateSession"] > 2


@pytest.mark.parametrize("multiplex", [False, True])
async def test_timeouts_per_client_and_per_call(
    scripted: tuple[Scripted, str], multiplex: bool
) -> None:
    servicer, target = scripted
    servicer.stall = 60.0  # no answer within any timeout here
    async with (
        SeqServeClient(target, timeout=1.0, multiplex=multiplex) as client,
        SeqServeClient(target, timeout=30.0, multiplex=multiplex) as patient,
    ):
        session = await client.create_session("m")
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceededError) as err:
            await session.feed(tokens=[1])
        assert 0.95 < time.monotonic() - started < 10.0  # the client's 1 s, not the 60 s stall
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The call's own, shorter: told apart from its client's 30 s by a margin no stall of
        # a busy host closes.
        waiting = await patient.create_session("m")
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceededError):
            await waiting.feed(tokens=[1], timeout=0.1)
        assert time.monotonic() - started < 10.0  # not the client's 30 s
        servicer.stall = 1.5  # past the client's 1 s, well within the call's
        assert (await session.feed(tokens=[1], timeout=15)).position == 1  # the call's, longer


@pytest.mark.parametrize("multiplex", [True, False])
async def test_a_call_in_flight_when_the_client_closes_is_cancelled(
    scripted: tuple[Scripted, str], multiplex: bool
) -> None:
    """Its channel cancels a Step, the multiplexer a feed on its Stream: either way the app
    gets `asyncio.CancelledError`."""
    servicer, target = scripted
    servicer.stall = 5.0
    client = SeqServeClient(target, multiplex=multiplex)
    session = await client.create_session("m")
    feed = asyncio.ensure_future(session.feed(tokens=[1]))
    await asyncio.sleep(0.3)  # sent, unanswered
    await client.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(feed, 3)


@pytest.mark.parametrize("multiplex", [True, False])
async def test_every_call_after_close_is_refused_with_one_message(
    scripted: tuple[Scripted, str], multiplex: bool
) -> None:
    """A feed, a generation, a create, a model lookup and a close made after `close()`: each
    `grpc.aio.UsageError("the client is closed")`, multiplexed or not (a plain call got gRPC's
    own "Channel is closed"), and nothing reaches the server."""
    servicer, target = scripted
    client = SeqServeClient(target, multiplex=multiplex)
    session = await client.create_session("m")
    await client.close()
    before = dict(servicer.calls)
    calls = [
        lambda: session.feed(tokens=[1]),
        lambda: _drain(session.generate("a", max_tokens=2)),
        lambda: client.create_session("m"),
        lambda: client.get_model("m"),
        lambda: session.close(),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.UsageError) as err:
            await call()
        assert err.value.args == ("the client is closed",), err.value.args
    assert servicer.calls == before


@pytest.mark.parametrize("backoff", [0.01, 30.0])
async def test_a_timeout_bounds_the_retries_too(
    scripted: tuple[Scripted, str], backoff: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeout ends the retries, and says so: DeadlineExceededError when it is spent, not
    the last UNAVAILABLE as soon as the next backoff would pass it (with a 30 s backoff, at
    once), nor after that backoff (15-45 s). The time left goes to one last attempt."""
    servicer, target = scripted
    servicer.failures = 10**6
    policy = RetryPolicy(first_backoff_seconds=backoff, max_backoff_seconds=backoff)
    paused: list[float] = []
    pause = Pauses.sleep

    async def sleep(pauses: Pauses, seconds: float) -> None:
        paused.append(seconds)
        await pause(pauses, seconds)

    monkeypatch.setattr(Pauses, "sleep", sleep)
    async with SeqServeClient(target, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceededError):
            await client.create_session("m", timeout=3.0)
        assert 2.95 <= time.monotonic() - started < 10.0
    # After the first refusal it waited to try again within the time left (half of it, with
    # the 30 s backoff): neither gave up at once nor waited out the backoff; then tried again
    # (only a stall of the host longer than that half could spend the rest first).
    assert paused and paused[0] < 3.0 / 2
    assert servicer.calls["CreateSession"] >= 2


async def test_the_channel_has_its_own_retries_off() -> None:
    async with SeqServeClient("127.0.0.1:1") as client:
        assert ("grpc.enable_retries", 0) in client.channel_options
        assert ("grpc.service_config_disable_resolution", 1) in client.channel_options
        assert not any(key == "grpc.service_config" for key, _ in client.channel_options)


async def test_a_number_out_of_its_field_s_range_is_invalid_argument_not_a_value_error(
    server: SeqServeServer,  # noqa: F811
) -> None:
    """Protobuf refuses it while the request is built; the app gets the class the server
    would have sent, and nothing is sent."""
    async with SeqServeClient(f"127.0.0.1:{server.port}") as c:
        with pytest.raises(errors.InvalidArgumentError):
            await c.create_session("tok", seed=-1)
        session = await c.create_session("tok", seed=1)
        with pytest.raises(errors.InvalidArgumentError):
            await session.feed(tokens=[2**40])
        with pytest.raises(errors.InvalidArgumentError):
            await session.feed(tokens=[1], top_k=2**40)
        with pytest.raises(errors.InvalidArgumentError):
            [p async for p in session.generate(max_tokens=2**40)]
        with pytest.raises(errors.InvalidArgumentError):
            await session.fork(seed=-1)
        assert (await session.feed(tokens=[1])).position == 1  # nothing of those was applied


# Arguments of the wrong type: each call, and the argument the message must name.
WRONG_TYPES: list[tuple[str, str, dict[str, object]]] = [
    ("feed", "text", {"text": 123}),
    ("feed", "text", {"text": b"abc"}),  # protobuf took bytes as the text, silently
    ("feed", "text", {"text": b"\xff"}),
    ("feed", "tokens", {"tokens": [1.5]}),
    ("feed", "tokens", {"tokens": ["a"]}),
    ("feed", "tokens", {"tokens": "ab"}),
    ("feed", "tokens", {"tokens": 5}),
    ("feed", "frames", {"frames": ["0.5"]}),
    ("feed", "frames", {"frames": [None]}),
    ("feed", "top_k", {"tokens": [1], "top_k": 1.5}),
    ("feed", "top_k", {"tokens": [1], "top_k": "3"}),
    ("generate", "prompt", {"prompt": b"hi"}),
    ("generate", "prompt", {"prompt": 5}),
    ("generate", "temperature", {"temperature": "hot"}),
    ("generate", "top_k", {"top_k": 2.0}),
    ("generate", "top_p", {"top_p": "0.9"}),
    ("generate", "max_tokens", {"max_tokens": 1.5}),
    ("generate", "stop", {"stop": "\n\n"}),  # two stop strings "\n", silently
    ("generate", "stop", {"stop": [b"\n"]}),
    ("generate", "stop_token_ids", {"stop_token_ids": [1.5]}),
    ("create_session", "seed", {"seed": "7"}),
    ("create_session", "ttl_seconds", {"ttl_seconds": "60"}),
    ("create_session", "ttl_seconds", {"ttl_seconds": float("inf")}),
    ("create_session", "sampling", {"sampling": {"temperature": 0.5}}),
    ("fork", "seed", {"seed": 1.5}),
    ("feed", "timeout", {"text": "a", "timeout": "5"}),  # a bare TypeError from the retries
    ("feed", "timeout", {"tokens": [1], "timeout": float("nan")}),  # no limit, silently
    ("generate", "timeout", {"timeout": "1"}),
    ("fork", "timeout", {"timeout": True}),
    ("create_session", "ttl_seconds", {"ttl_seconds": 0}),  # the server's default, silently
    ("create_session", "route_key", {"route_key": "josé"}),  # gRPC's own error: no header
    ("create_session", "route_key", {"route_key": "a b"}),
    # The names and ids client.py sends: protobuf's bare TypeError, or bytes taken as UTF-8.
    ("create_session", "model", {"model": 123}),
    ("create_session", "model", {"model": b"tok"}),
    ("create_session", "version", {"version": 1}),  # "1", an alias or "" (the default)
    ("create_session", "version", {"version": b"1"}),
    ("create_session", "route_key", {"route_key": 5}),
    ("create_session", "route_key", {"route_key": b"k"}),
    ("attach", "session_id", {"session_id": 5}),
    ("attach", "session_id", {"session_id": b"id"}),
    ("get_model", "name", {"name": 5}),
    ("get_model", "name", {"name": b"tok"}),
    ("set_alias", "name", {"name": b"tok"}),
    ("set_alias", "alias", {"alias": 5}),
    ("set_alias", "version", {"version": "1"}),
    ("delete_alias", "alias", {"alias": b"beta"}),
]


@pytest.mark.parametrize(("call", "argument", "kwargs"), WRONG_TYPES)
async def test_an_argument_of_the_wrong_type_is_invalid_argument_refused_by_the_client(
    server: SeqServeServer,  # noqa: F811
    call: str,
    argument: str,
    kwargs: dict[str, object],
) -> None:
    """As a number out of its field's range: InvalidArgumentError naming the argument, with
    nothing sent (not protobuf's TypeError, and no bytes or string taken for something else)."""
    async with SeqServeClient(f"127.0.0.1:{server.port}") as c:
        session = await c.create_session("tok", seed=1)
        with pytest.raises(errors.InvalidArgumentError) as err:
            if call == "feed":
                await session.feed(**kwargs)
            elif call == "generate":
                [p async for p in session.generate(**{"max_tokens": 2, **kwargs})]
            elif call == "create_session":
                await c.create_session(**{"model": "tok", **kwargs})
            elif call == "attach":
                await c.attach(**kwargs)
            elif call == "get_model":
                await c.get_model(**kwargs)
            elif call == "set_alias":
                await c.set_alias(**{"name": "tok", "alias": "beta", "version": 1, **kwargs})
            elif call == "delete_alias":
                await c.delete_alias(**{"name": "tok", "alias": "beta", **kwargs})
            else:
                await session.fork(**kwargs)
        assert err.value.message.startswith(argument + " "), err.value.message
        assert err.value.message.endswith("(refused by the client)")
        assert err.value.reason == "INVALID_ARGUMENT"  # as the server's: nothing was applied
        assert (await session.refresh()).position == 0  # nothing of it was applied
        assert (await c.get_model("tok")).aliases == {}


async def test_any_sequence_of_ints_or_numbers_is_still_taken(
    server: SeqServeServer,  # noqa: F811
) -> None:
    import numpy as np

    async with SeqServeClient(f"127.0.0.1:{server.port}") as c:
        session = await c.create_session("tok", seed=1)
        assert (await session.feed(tokens=range(2))).position == 2
        assert (await session.feed(tokens=np.array([3, 4]), top_k=np.int64(2))).position == 4
        series = await c.create_session("frames", ttl_seconds=np.float32(60))
        assert (await series.feed(frames=np.array([0.5, 1, 2], dtype=np.float32))).position == 1
        pieces = [p async for p in session.generate(max_tokens=2, stop=("\n",), top_p=1)]
        assert len(pieces) == 2


@pytest.mark.parametrize("multiplex", [True, False])
async def test_an_infinite_or_huge_timeout_is_no_limit(
    server: SeqServeServer,  # noqa: F811
    multiplex: bool,
) -> None:
    """`math.inf` (and a finite timeout past what gRPC's deadline can hold, ~9.2e9 s) bounds
    nothing: the calls are answered, not failed at once with DeadlineExceededError."""
    target = f"127.0.0.1:{server.port}"
    async with SeqServeClient(target, timeout=math.inf, multiplex=multiplex) as c:
        session = await c.create_session("tok", seed=1)
        assert (await session.feed(tokens=[1, 2])).position == 2
        assert (await session.feed(tokens=[3], timeout=1e12)).position == 3
        pieces = [p async for p in session.generate(max_tokens=2, timeout=math.inf)]
        assert pieces[-1].position == 5
        assert [m.name for m in await c.list_models(timeout=1e10)] == ["frames", "tok"]


@pytest.mark.parametrize("multiplex", [True, False])
async def test_a_session_id_no_header_can_carry_is_answered_by_the_server(
    server: SeqServeServer,  # noqa: F811
    multiplex: bool,
) -> None:
    """An id with a routing key gRPC cannot send as a header (not printable ASCII) is asked
    for without one: the server answers it as any id it does not hold, not gRPC's own
    ExecuteBatchError from the channel."""
    async with SeqServeClient(f"127.0.0.1:{server.port}", multiplex=multiplex) as c:
        for session_id in ("s_josé.abc", "s_a\nb.abc"):
            with pytest.raises(errors.SessionNotFoundError):
                await c.attach(session_id)
            handle = ClientSession(c, types.Session(session_id=session_id))
            with pytest.raises(errors.SessionNotFoundError):
                await handle.feed(tokens=[1])


async def test_a_target_that_is_not_a_str_is_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="target must be a str"):
        SeqServeClient(123)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgumentError, match="timeout must be a number"):
        SeqServeClient("127.0.0.1:1", timeout="10")  # type: ignore[arg-type]

"""What the server makes per session and per request is freed by reference counts alone, so
freezing what survives a collection (service.api.gc_tuning) keeps no garbage: every request
path, run with the cycle collector off, leaves no reference cycle behind but grpc's own (a
closure its server makes to look up each call's handler, garbage at once). That holds for calls
that succeed, calls the client cancels, and calls that fail."""

from __future__ import annotations

import collections
import gc
from collections.abc import Awaitable, Callable

import grpc
from deploy.traffic import MODEL, Traffic

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from tests.polling import until

from .conftest import ServerFactory
from .test_state_dir_faults import _break as break_journal

# grpc.aio's server makes a closure to look up each call's handler (`_find_method_handler`):
# a cycle holding the call's details and their metadata, garbage as soon as the call is
# dispatched. What that closure reaches is left out; nothing else may be garbage.
GRPC_DISPATCH = "__find_method_handler"


def _dispatch_garbage(garbage: list[object]) -> set[int]:
    """Ids of the dispatch closures in `garbage` and of what they reach within it."""
    ids = {id(o) for o in garbage}
    stack = [o for o in garbage if type(o).__name__.endswith(GRPC_DISPATCH)]
    stack += [o for o in garbage if GRPC_DISPATCH.strip("_") in getattr(o, "__qualname__", "")]
    reached: set[int] = set()
    while stack:
        o = stack.pop()
        if id(o) in reached:
            continue
        reached.add(id(o))
        stack.extend(r for r in gc.get_referents(o) if id(r) in ids)
    return reached


def _kind(o: object) -> str:
    return f"{type(o).__module__}.{type(o).__qualname__}"


async def _expire(client: SeqServeClient, server: SeqServeServer) -> None:
    """Sessions fed, then left to expire (a closed one's last request is the close; an expired
    one keeps its last feed's reply)."""
    before = server.engine.stats().sessions_in_memory
    # Fed within their TTL of being made: a loaded host's stall of 0.2 s (the TTL this had)
    # expired one before its feed.
    sessions = [await client.create_session(MODEL, ttl_seconds=1.0) for _ in range(2)]
    for session in sessions:
        await session.feed(tokens=[1, 2])
    await until(
        lambda: server.engine.stats().sessions_in_memory <= before,
        10,
        "the sweep to expire the sessions",
        interval=0.05,
    )


async def _garbage(rounds: Callable[[], Awaitable[None]], times: int = 3) -> list[object]:
    """What the cycle collector finds unreachable after `rounds` ran `times` with it off."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection finds unreachable, to look at
    try:
        for _ in range(times):
            await rounds()
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _assert_only_dispatch(garbage: list[object], calls: int) -> None:
    dispatches = sum(1 for o in garbage if _kind(o).endswith("_HandlerCallDetails"))
    assert dispatches >= calls  # the audit sees cycles where there are some
    dispatch = _dispatch_garbage(garbage)
    kinds = collections.Counter(_kind(o) for o in garbage if id(o) not in dispatch)
    assert not kinds, kinds.most_common(20)


async def test_request_paths_leave_no_reference_cycles(server_factory: ServerFactory) -> None:
    """Create, fork, Step, Stream (feeds and a generation), Generate, close, expiry: three
    rounds."""
    server = await server_factory(sessions={"sweep_interval_seconds": 0.05})
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        traffic = Traffic(client)
        await traffic.close(await traffic.open())  # what loads once (the model, the stubs)

        async def rounds() -> None:
            opened = await traffic.open()
            await traffic.drive(opened)
            await traffic.close(opened)
            await _expire(client, server)

        garbage = await _garbage(rounds)
    _assert_only_dispatch(garbage, 3 * traffic.sessions)


async def _until_idle(server: SeqServeServer, session_ids: list[str]) -> None:
    """Until no request holds these sessions (a cancelled call lets go as it unwinds)."""
    await until(
        lambda: (
            not any(getattr(server.engine.sessions.peek(sid), "busy", False) for sid in session_ids)
        ),
        10,
        "the cancelled calls to let go of their sessions",
        interval=0.02,
    )


async def test_cancelled_calls_leave_no_reference_cycles(server_factory: ServerFactory) -> None:
    """A Stream cancelled while its generations run, and a Generate cancelled after its first
    token."""
    server = await server_factory()
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        streamed = [await client.create_session(MODEL) for _ in range(4)]
        generating = await client.create_session(MODEL)
        sampling = types.Sampling(temperature=1.0, max_tokens=500)
        ids = [s.session_id for s in (*streamed, generating)]

        async def rounds() -> None:
            call = client.sessions.Stream()
            items = [
                pb.StreamItem(
                    session_id=s.session_id, generate=types.GenerateSpec(sampling=sampling)
                )
                for s in streamed
            ]
            await call.write(pb.StreamRequest(items=items))
            async for _ in call:
                break
            call.cancel()
            generate = client.sessions.Generate(
                pb.GenerateRequest(session_id=generating.session_id, sampling=sampling)
            )
            async for _ in generate:
                break
            generate.cancel()
            await _until_idle(server, ids)

        await rounds()  # what loads once
        garbage = await _garbage(rounds)
    _assert_only_dispatch(garbage, 3)


async def test_failed_calls_leave_no_reference_cycles(server_factory: ServerFactory) -> None:
    """Calls refused at each depth: an unknown model, an unknown session, a Step at the wrong
    position (refused with the session leased and its feed made), a Generate with bad sampling
    and one on an unknown session (streaming), a Stream whose message is not protobuf (first,
    or once the stream is multiplexed), and Stream items refused in-band. A status
    raised with `context.abort` kept its exception on the call's state, and the exception's
    traceback held the frames that led to it: a cycle for each."""
    server = await server_factory()
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        session = await client.create_session(MODEL)
        await session.feed(tokens=[1, 2])
        sid = session.session_id
        stub = client.sessions
        one = types.Input(tokens=types.Tokens(ids=[3]))

        raw = client.channel.stream_stream(
            "/seqserve.v1.SessionService/Stream",
            request_serializer=lambda b: b,
            response_deserializer=pb.StreamResponse.FromString,
        )
        bad = types.Sampling(temperature=-1.0, max_tokens=2)
        two_items = pb.StreamRequest(
            items=[pb.StreamItem(session_id=sid, input=one), pb.StreamItem(session_id=sid)]
        ).SerializeToString()
        calls = [
            (lambda: stub.CreateSession(pb.CreateSessionRequest(model="no-such-model")),
             grpc.StatusCode.NOT_FOUND),
            (lambda: stub.Step(pb.StepRequest(session_id="no-such-session", input=one)),
             grpc.StatusCode.NOT_FOUND),
            (lambda: stub.Step(pb.StepRequest(session_id=sid, input=one, expected_position=99)),
             grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: stub.Generate(pb.GenerateRequest(session_id=sid, sampling=bad)),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: stub.Generate(pb.GenerateRequest(session_id="no-such-session")),
             grpc.StatusCode.NOT_FOUND),
            (lambda: raw(iter([b"\xff\xff\xff"])), grpc.StatusCode.INVALID_ARGUMENT),
        ]  # fmt: skip

        async def rounds() -> None:
            # The status is awaited, not raised: a client's exception is a cycle of its own.
            for call, code in calls:
                assert await call().code() == code
            # Items refused in-band: the stream itself ends OK (its replies read first).
            refused = [
                pb.StreamItem(session_id="no-such-session", input=one),
                pb.StreamItem(session_id=sid, input=one, expected_position=99),
            ]
            stream = stub.Stream(iter([pb.StreamRequest(items=refused)]))
            replies = [reply async for response in stream for reply in response.replies]
            assert [r.error.code for r in replies] == [5, 9]  # NOT_FOUND, FAILED_PRECONDITION
            # Multiplexed (a message of two items, answered), then one that is not protobuf.
            mixed = raw()
            await mixed.write(two_items)
            answered = 0
            while answered < 2:
                answered += len((await mixed.read()).replies)
            await mixed.write(b"\xff\xff\xff")
            assert await mixed.code() == grpc.StatusCode.INVALID_ARGUMENT

        await rounds()  # what loads once
        garbage = await _garbage(rounds)
    _assert_only_dispatch(garbage, 3 * len(calls))


async def test_steps_the_journal_refuses_leave_no_reference_cycles(
    server_factory: ServerFactory,
) -> None:
    """A journal write that fails refuses the step with UNAVAILABLE: generations on one Stream
    share the step's error (each raises it in its own frame), a Step and a Generate call fail
    with it. Three rounds, the journal broken before each (it moves to a new segment)."""
    server = await server_factory()
    journal = server.engine.durability.journal
    assert journal is not None
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        sessions = [await client.create_session(MODEL) for _ in range(5)]
        for session in sessions:
            await session.feed(tokens=[1])
        stub, one = client.sessions, types.Input(tokens=types.Tokens(ids=[3]))
        unavailable = grpc.StatusCode.UNAVAILABLE
        sampling = types.Sampling(max_tokens=2)

        async def broken() -> None:
            await sessions[4].feed(tokens=[1])  # a write that opens the journal's next segment
            break_journal(journal)

        async def rounds() -> None:
            await broken()
            items = [
                pb.StreamItem(
                    session_id=s.session_id, generate=types.GenerateSpec(sampling=sampling)
                )
                for s in sessions[:2]
            ]
            stream = stub.Stream(iter([pb.StreamRequest(items=items)]))
            replies = [reply async for response in stream for reply in response.replies]
            assert [r.error.code for r in replies] == [unavailable.value[0]] * 2
            await broken()
            step = pb.StepRequest(session_id=sessions[2].session_id, input=one)
            assert await stub.Step(step).code() == unavailable
            await broken()
            generate = pb.GenerateRequest(session_id=sessions[3].session_id, sampling=sampling)
            assert await stub.Generate(generate).code() == unavailable

        await rounds()  # what loads once
        garbage = await _garbage(rounds)
    _assert_only_dispatch(garbage, 3 * 3)

"""The multiplexing client over real gRPC: feeds awaited concurrently on one client go out as
Stream messages (one per tick, one Stream per routing key) and come back exact, each with its
own result or its own error class; against a real gRPC server whose Stream records what it
gets and stops answering as a test says, a stalled or ended Stream is replaced and its feeds
retried once each, and a feed's timeout holds."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import pytest

from service.api.server import SeqServeServer
from service.client import errors
from service.client.client import ClientSession, SeqServeClient, route_metadata
from service.client.results import Prediction
from service.client.retry import RetryPolicy
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from tests.api.conftest import (  # noqa: F401 - fixtures
    ServerFactory,
    server,
    server_factory,
    store_root,
)
from tests.api.support import ReferenceSession, assert_matches_reference, tokens
from tests.grpc_support import serving
from tests.polling import until

FAST = RetryPolicy(deadline_seconds=10, first_backoff_seconds=0.01, max_backoff_seconds=0.05)


async def test_concurrent_feeds_go_out_together_and_come_back_exact(
    server: SeqServeServer,  # noqa: F811
    store_root: Path,  # noqa: F811
) -> None:
    async with SeqServeClient(f"127.0.0.1:{server.port}", multiplex=True, route_key="app") as c:
        sessions = [await c.create_session("tok", seed=i) for i in range(32)]
        chunks = [[(i * 7 + k) % 256 for k in range(1 + i % 3)] for i in range(32)]
        got = await asyncio.gather(
            *(s.feed(tokens=chunk, top_k=3) for s, chunk in zip(sessions, chunks, strict=True))
        )
        for session, chunk, prediction in zip(sessions, chunks, got, strict=True):
            assert prediction.position == len(chunk) == session.position
        step = await c.sessions.Step(  # one more, as a Step, to compare with the reference
            pb.StepRequest(session_id=sessions[5].session_id, input=tokens(9))
        )
        reference = ReferenceSession(store_root, "tok")
        reference.feed(chunks[5])
        assert_matches_reference(step.prediction, reference.feed([9])[-1])
        with pytest.raises(grpc.aio.AioRpcError) as err:  # an item's own error, as for Step
            await sessions[0].feed(tokens=[999])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def counted() -> str | None:
        text = server.metrics.render().decode()
        return text if 'method="Stream"' in text else None

    # A Stream is counted when it ends, just after the client closes it; the feeds went as
    # Stream items.
    text = await until(counted, 60, "a Stream to be counted", interval=0.02)
    steps = [
        line
        for line in text.splitlines()
        if line.startswith("seqserve_rpc_duration_seconds_count") and 'method="Step"' in line
    ]
    assert steps == [
        'seqserve_rpc_duration_seconds_count{code="OK",method="Step",protocol="grpc"} 1.0'
    ]


async def test_a_position_mismatch_is_the_same_class_and_resyncs(
    server: SeqServeServer,  # noqa: F811
) -> None:
    async with SeqServeClient(f"127.0.0.1:{server.port}") as c:  # multiplexing by default
        assert c.mux is not None
        session = await c.create_session("tok")
        other = await c.attach(session.session_id)
        await other.feed(tokens=[1, 2])
        with pytest.raises(errors.PositionMismatchError) as err:
            await session.feed(tokens=[3])
        assert err.value.position == 2 == session.position
        assert (await session.feed(tokens=[3])).position == 3


# ---- against a Stream that records what it gets, and answers as each test says ---------------


class Recorded(pb_grpc.SessionServiceServicer):
    """Records the items of each Stream message, by Stream call. `silent`: the first that many
    Stream calls read their messages and answer nothing, ever; `end_early`: the first that many
    end (OK) after reading one message, unanswered. Others answer each item at position
    expected_position + 1, or with `abort_once` ABORTED (another request on the session is
    running) the first time they see its request id."""

    def __init__(self, silent: int = 0, end_early: int = 0, abort_once: bool = False) -> None:
        self.silent, self.end_early, self.abort_once = silent, end_early, abort_once
        self.messages: list[list[list[pb.StreamItem]]] = []  # per call, per message
        self.answered: set[str] = set()
        self.ended: list[int] = []  # the calls whose client half-closed them, by number

    async def Stream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.messages.append(received := [])
        call = len(self.messages)
        async for request in request_iterator:
            received.append(list(request.items))
            if call <= self.end_early:
                return
            if call <= self.end_early + self.silent:
                continue
            yield pb.StreamResponse(replies=[self._reply(item) for item in request.items])
        self.ended.append(call)

    def _reply(self, item: pb.StreamItem) -> pb.StreamReply:
        reply = pb.StreamReply(session_id=item.session_id, request_id=item.request_id)
        if self.abort_once and item.request_id not in self.answered:
            self.answered.add(item.request_id)
            reply.error.code = grpc.StatusCode.ABORTED.value[0]
            reply.error.message = "another request on this session is running"
            return reply
        reply.position = item.expected_position + 1
        reply.prediction.position = item.expected_position + 1
        return reply


def recorded(servicer: Recorded) -> AbstractAsyncContextManager[str]:
    return serving(servicer)


def _sessions(client: SeqServeClient, n: int) -> list[ClientSession]:
    """Handles on `n` sessions with the client's routing key, as `create_session` makes them."""
    return [
        ClientSession(client, types.Session(session_id=f"s_{client.route_key}.{i}", position=0))
        for i in range(n)
    ]


async def test_64_concurrent_feeds_are_one_stream_message_of_64_items() -> None:
    servicer = Recorded()
    async with recorded(servicer) as target, SeqServeClient(target) as client:
        sessions = _sessions(client, 64)
        got = await asyncio.gather(*(s.feed(tokens=[i]) for i, s in enumerate(sessions)))
        assert [p.position for p in got] == [1] * 64
        again = await asyncio.gather(*(s.feed(tokens=[i]) for i, s in enumerate(sessions)))
        assert [p.position for p in again] == [2] * 64
    assert len(servicer.messages) == 1  # one Stream for the client's one routing key
    assert [len(m) for m in servicer.messages[0]] == [64, 64]  # one message per tick
    first = servicer.messages[0][0]
    assert [item.session_id for item in first] == [s.session_id for s in sessions]
    assert [list(item.input.tokens.ids) for item in first] == [[i] for i in range(64)]


async def test_sessions_on_other_route_keys_get_their_own_streams() -> None:
    servicer = Recorded()
    async with recorded(servicer) as target, SeqServeClient(target) as client:
        sessions = [
            ClientSession(client, types.Session(session_id=f"s_user{i % 2}.{i}")) for i in range(4)
        ]
        await asyncio.gather(*(s.feed(tokens=[1]) for s in sessions))
    assert sorted(len(m[0]) for m in servicer.messages) == [2, 2]


@pytest.mark.parametrize("how", ["silent", "end_early"])
async def test_a_stream_that_stops_answering_is_replaced_and_each_feed_applies_once(
    how: str,
) -> None:
    servicer = Recorded(**{how: 1})
    async with (
        recorded(servicer) as target,
        SeqServeClient(target, stall_seconds=0.5, retry=FAST) as client,
    ):
        sessions = _sessions(client, 8)
        started = time.monotonic()
        got = await asyncio.gather(*(s.feed(tokens=[7]) for s in sessions))  # no timeout set
        waited = time.monotonic() - started
        assert client.mux is not None and client.mux.streams_opened == 2
    assert [p.position for p in got] == [1] * 8
    assert waited < 10.0  # the stall (0.5 s) was noticed: no timeout is set to end the wait
    if how == "silent":
        assert waited >= 0.45
    first, second = (
        sorted((i.request_id, i.expected_position) for message in call for i in message)
        for call in servicer.messages
    )
    # Each feed was sent once on each Stream (retries back off apart: maybe several messages),
    # and its retry is the same request: same request id, same expected position.
    assert first == second and len(first) == len(set(first)) == 8


async def test_a_feed_on_a_stalled_stream_honours_its_timeout() -> None:
    servicer = Recorded(silent=10**6)
    async with (
        recorded(servicer) as target,
        SeqServeClient(target, timeout=1.0, stall_seconds=60) as client,
        SeqServeClient(target, timeout=30.0, stall_seconds=60) as patient,
    ):
        (session,) = _sessions(client, 1)
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceededError):
            await session.feed(tokens=[1])
        assert 0.95 < time.monotonic() - started < 10.0  # the client's 1 s, not the 60 s stall
        # The call's own: told apart from its client's 30 s by a margin no stall of a busy
        # host closes.
        (waiting,) = _sessions(patient, 1)
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceededError):
            await waiting.feed(tokens=[1], timeout=0.1)
        assert time.monotonic() - started < 10.0  # not the client's 30 s


async def test_multiplex_false_feeds_by_step(server: SeqServeServer) -> None:  # noqa: F811
    async with SeqServeClient(f"127.0.0.1:{server.port}", multiplex=False) as c:
        assert c.mux is None and c.route_key is None  # a random routing key per session
        one, two = await c.create_session("tok"), await c.create_session("tok")
        assert route_metadata(one.session_id) != route_metadata(two.session_id)
        await asyncio.gather(one.feed(tokens=[1]), two.feed(tokens=[2]))
    text = server.metrics.render().decode()
    assert 'code="OK",method="Step",protocol="grpc"} 2.0' in text
    assert 'method="Stream"' not in text


async def test_a_resend_refused_as_aborted_is_retried_only_after_a_broken_stream() -> None:
    """After a Stream went silent, the first copy may still run on the server when the resend
    arrives (ABORTED): retried, it applies once. Without a broken Stream, ABORTED is the
    app's (two requests at once on one session), raised as AbortedError."""
    servicer = Recorded(silent=1, abort_once=True)
    async with (
        recorded(servicer) as target,
        SeqServeClient(target, stall_seconds=0.3, retry=FAST) as client,
    ):
        (session,) = _sessions(client, 1)
        assert (await session.feed(tokens=[1])).position == 1
        sent = [i.request_id for call in servicer.messages for m in call for i in m]
        assert len(sent) == 3 and len(set(sent)) == 1  # silent, ABORTED, answered
        with pytest.raises(errors.AbortedError):
            await session.feed(tokens=[2])  # on a working Stream: not retried


class _SecondAnsweredLate(Recorded):
    """Answers a Stream's second message `late` seconds after it reads it."""

    def __init__(self, late: float) -> None:
        super().__init__()
        self.late = late

    async def Stream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.messages.append(received := [])
        async for request in request_iterator:
            received.append(list(request.items))
            if len(received) == 2:
                await asyncio.sleep(self.late)
            yield pb.StreamResponse(replies=[self._reply(item) for item in request.items])


async def test_a_stream_is_not_called_broken_for_the_time_the_application_held_the_loop() -> None:
    """The application blocks the event loop (CPU work, a blocking call) for 2.5 s, over
    twice the stall time, while a feed is pending; its reply comes 0.1 s after the loop is
    free. The watchdog runs late, as the loop frees: that time is the loop's, not the
    Stream's silence, and the reply is taken on the same Stream, nothing sent again. (It was
    called broken at once, and the feed sent again on a new Stream.)"""
    servicer = _SecondAnsweredLate(late=2.6)
    async with (
        recorded(servicer) as target,
        SeqServeClient(target, stall_seconds=1.0, retry=FAST) as client,
    ):
        (session,) = _sessions(client, 1)
        assert (await session.feed(tokens=[1])).position == 1  # the Stream is open
        feed = asyncio.ensure_future(session.feed(tokens=[2]))
        for _ in range(60_000):  # until the server has the item (a loaded host: seconds)
            if len(servicer.messages[0]) == 2:
                break
            await asyncio.sleep(0.001)
        time.sleep(2.5)  # the application holds the loop
        assert (await asyncio.wait_for(feed, 30)).position == 2
        assert client.mux is not None and client.mux.streams_opened == 1
    assert len(servicer.messages) == 1 and len(servicer.messages[0]) == 2  # sent once each


async def test_a_tick_of_big_feeds_is_split_under_the_message_limit() -> None:
    servicer = Recorded()
    limit = 64 * 1024
    async with (
        recorded(servicer) as target,
        SeqServeClient(target, max_message_bytes=limit) as client,
    ):
        sessions = _sessions(client, 12)
        chunk = [7] * 20_000  # ~20 KB an item: three to a message
        got = await asyncio.gather(*(s.feed(tokens=chunk) for s in sessions))
    assert [p.position for p in got] == [1] * 12
    (messages,) = servicer.messages
    assert len(messages) > 1 and sum(len(m) for m in messages) == 12
    assert all(pb.StreamRequest(items=m).ByteSize() <= limit for m in messages)


async def test_the_stream_of_a_key_left_unused_is_ended() -> None:
    """A gateway with a routing key per user must not keep a Stream per user forever."""
    servicer = Recorded()
    async with recorded(servicer) as target, SeqServeClient(target) as client:
        assert client.mux is not None
        client.mux.idle_seconds = 0.3
        user1, user2 = (
            ClientSession(client, types.Session(session_id=f"s_user{i}.x")) for i in (1, 2)
        )
        await user1.feed(tokens=[1])
        await user2.feed(tokens=[1])
        assert client.mux.streams_opened == 2
        await asyncio.sleep(0.5)
        # The next flush after the idle time ends both Streams, and opens one for this feed.
        assert (await user2.feed(tokens=[2])).position == 2
        # From here on no Stream is idle (a busy host's stall past 0.3 s would make user2's so).
        client.mux.idle_seconds = 60.0
        await until(  # a loaded host may take seconds to end them
            lambda: len(servicer.ended) == 2, 60, "the server to end both idle Streams"
        )
        assert sorted(servicer.ended) == [1, 2]  # half-closed by the client, ended by the server
        assert (await user1.feed(tokens=[2])).position == 2  # a new Stream when needed
        assert client.mux.streams_opened == 4
        await user2.feed(tokens=[3])  # its Stream goes on, not replaced
        assert client.mux.streams_opened == 4 and len(servicer.ended) == 2


@pytest.mark.parametrize("multiplex", [True, False])
async def test_a_feed_that_timed_out_after_it_was_applied_is_sent_again_as_itself(
    server: SeqServeServer,  # noqa: F811
    store_root: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    multiplex: bool,
) -> None:
    """The server applies the feed and its reply never comes (the handler holds it): the
    client's feed times out, its outcome unknown. Fed again with the same input, it is the
    same request (applied once: the server answers it from what it remembers); fed with other
    input, the handle asks where the session is, with no spurious position mismatch."""
    engine = server.engine
    hold = asyncio.Event()
    applied: list[int] = []

    def held(real):  # type: ignore[no-untyped-def]
        async def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = await real(*args, **kwargs)
            applied.append(1)
            await hold.wait()  # the reply is held until the test lets it go
            return result

        return call

    reference = ReferenceSession(store_root, "tok")
    async with SeqServeClient(f"127.0.0.1:{server.port}", multiplex=multiplex) as c:
        session = await c.create_session("tok", seed=1)

        async def timed_out(ids: list[int]) -> None:
            """`ids` fed, applied by the server, and the feed past its timeout."""
            hold.clear()
            monkeypatch.setattr(engine, "feed", held(engine.feed))
            monkeypatch.setattr(engine, "feed_many", held(engine.feed_many))
            applied.clear()
            with pytest.raises(errors.DeadlineExceededError):
                # Long enough for a loaded host to deliver and apply it: the reply is held anyway.
                await session.feed(tokens=ids, top_k=3, timeout=1.0)
            assert applied  # the server applied it; the client could not know
            assert session.position is None  # not known any more
            hold.set()
            monkeypatch.undo()

        await timed_out([5, 6])
        again = await session.feed(tokens=[5, 6], top_k=3)  # the retry an app would make
        assert again.position == 2 == session.position  # applied once, not twice
        assert (await session.refresh()).position == 2
        assert_matches_reference(_as_pb(again), reference.feed([5, 6])[-1])
        # Another timed-out feed, then a different one: it goes on from the server's position.
        await timed_out([7])
        other = await session.feed(tokens=[8], top_k=3)
        assert other.position == 4 == session.position
        reference.feed([7])
        assert_matches_reference(_as_pb(other), reference.feed([8])[-1])
        # The app cancels a feed the server has applied: the same, sent again, applies once.
        hold.clear()
        applied.clear()
        monkeypatch.setattr(engine, "feed", held(engine.feed))
        monkeypatch.setattr(engine, "feed_many", held(engine.feed_many))
        feeding = asyncio.create_task(session.feed(tokens=[9], top_k=3))
        for _ in range(6_000):  # a loaded host may take seconds
            if applied:
                break
            await asyncio.sleep(0.01)
        feeding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await feeding
        hold.set()
        monkeypatch.undo()
        last = await session.feed(tokens=[9], top_k=3)
        assert last.position == 5 == (await session.refresh()).position
        # Timed out again, then a generation: the unsettled feed is given up, so the same
        # input fed after it is a new feed at the new position (not a resend of the old one,
        # which got a spurious PositionMismatchError, or with a stopped generation just before,
        # applied twice).
        await timed_out([4])
        pieces = [p async for p in session.generate(max_tokens=2, temperature=1.0)]
        assert pieces[-1].position == 8
        after = await session.feed(tokens=[4], top_k=3)
        assert after.position == 9 == (await session.refresh()).position


@pytest.mark.parametrize("multiplex", [True, False])
@pytest.mark.parametrize("then", ["other", "same", "generate"])
async def test_the_call_after_a_feed_left_while_its_step_runs_waits_that_step_out(
    server_factory: ServerFactory,  # noqa: F811
    store_root: Path,  # noqa: F811
    multiplex: bool,
    then: str,
) -> None:
    """The app gives up on a feed (cancelled here; a timeout is the same) while the server is
    still stepping it. The handle's next call, a feed of other input, the same input again, or
    a generation, goes on once that step is done: no SessionBusyError, no PositionMismatchError
    of the handle's own making (both were raised), and the left feed applied once."""
    srv = await server_factory(inline_max_rows=0)  # steps on the runner thread: gated below
    async with SeqServeClient(f"127.0.0.1:{srv.port}", multiplex=multiplex) as c:
        session = await c.create_session("tok", seed=1)
        served = srv.engine.versions.find("tok", 1)
        assert served is not None
        execute = served.runner.execute
        loop = asyncio.get_running_loop()
        started, release = asyncio.Event(), threading.Event()

        def gated(batch):  # type: ignore[no-untyped-def]
            if not started.is_set():  # the left feed's step, held until the next call is sent
                loop.call_soon_threadsafe(started.set)
                release.wait(60)
            return execute(batch)

        served.runner.execute = gated  # type: ignore[method-assign]
        try:
            left = asyncio.create_task(session.feed(tokens=[5, 6], top_k=3))
            await asyncio.wait_for(started.wait(), 60)
            left.cancel()
            with pytest.raises(asyncio.CancelledError):
                await left
            # The step goes on on the server; it ends a little after the next call is sent.
            loop.call_later(0.3, release.set)
            if then == "other":
                assert (await session.feed(tokens=[8], top_k=3)).position == 3
            elif then == "same":
                assert (await session.feed(tokens=[5, 6], top_k=3)).position == 2
            else:
                pieces = [p async for p in session.generate(max_tokens=2, temperature=1.0)]
                assert [p.position for p in pieces] == [3, 4]
        finally:
            release.set()
            served.runner.execute = execute  # type: ignore[method-assign]
        want = {"other": 3, "same": 2, "generate": 4}[then]
        assert session.position == want == (await session.refresh()).position


async def test_a_refused_resend_of_an_unsettled_feed_leaves_the_position_unknown() -> None:
    """The resend is refused (the session busy with the first copy, say) while the first
    may have applied: the handle must not keep the old position it resent at."""
    from types import SimpleNamespace

    session = ClientSession(
        SimpleNamespace(),  # type: ignore[arg-type]
        types.Session(session_id="s_x", position=7),
    )
    item = pb.StreamItem(session_id="s_x", request_id="r1", input=tokens(1), expected_position=7)
    session._unsettled = item
    resend = pb.StreamItem(session_id="s_x", request_id="r1", input=tokens(1), expected_position=7)
    busy = errors.SessionBusyError(grpc.StatusCode.ABORTED, "busy", reason="SESSION_BUSY")
    session._failed(resend, busy)  # what `feed` does with the exception before raising it
    assert session.position is None
    assert session._unsettled is item  # still resent as itself next


def _as_pb(prediction: Prediction) -> types.Prediction:
    """The client's prediction back as the message, to hold against the reference."""
    return types.Prediction(
        tokens=types.TokenPrediction(
            top=[types.TopToken(id=t.id, prob=t.prob, text=t.text) for t in prediction.top]
        ),
    )

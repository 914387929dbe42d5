"""StreamMux with the engine replaced by recorders: where each message's items run. A stream of
one session's plain feeds is answered in the stream's own task, a message at a time; the first
message that is anything else hands the stream to the multiplexer for good, and every item
still gets its reply. (Over a real server and channel: tests/api/test_stream.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from service.api.stream_mux import StreamMux
from service.engine.session_line import Line
from service.errors import NotFound
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import item, tokens


class Recorder:
    """The servicer's two callbacks: each records the task it ran in, per request id."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.ran_in: dict[str, asyncio.Task[object] | None] = {}
        self.lines: set[Line] = set()  # the Line each item was run on
        self.failing = failing

    async def feed_items(self, items: list[pb.StreamItem], line: Line) -> pb.StreamResponse:
        await asyncio.sleep(0)  # a step's wait
        for it in items:
            self.ran_in[it.request_id] = asyncio.current_task()
            self.lines.add(line)
            if it.request_id in self.failing:
                raise NotFound(f"session {it.session_id!r} not found")
        return pb.StreamResponse(
            replies=[
                pb.StreamReply(session_id=it.session_id, request_id=it.request_id, position=1)
                for it in items
            ]
        )

    async def run_item(self, it: pb.StreamItem, line: Line) -> AsyncIterator[pb.StreamReply]:
        self.ran_in[it.request_id] = asyncio.current_task()
        self.lines.add(line)
        for position in (1, 2):
            await asyncio.sleep(0)
            yield pb.StreamReply(
                session_id=it.session_id, request_id=it.request_id, position=position
            )


def feed(session_id: str, request_id: str) -> pb.StreamItem:
    return item(session_id, request_id, tokens(7))


Ran = tuple[list[pb.StreamResponse], "asyncio.Task[object] | None"]


async def run(mux: StreamMux, *messages: list[pb.StreamItem]) -> Ran:
    """Send `messages` on one stream; → the responses, and the task that consumed them."""

    async def incoming() -> AsyncIterator[pb.StreamRequest]:
        for items in messages:
            yield pb.StreamRequest(items=items)

    return [r async for r in mux.run(incoming())], asyncio.current_task()


def replied(responses: list[pb.StreamResponse]) -> list[tuple[str, int]]:
    return [(r.request_id, r.position) for response in responses for r in response.replies]


def mux_for(recorder: Recorder, max_items: int = 8, max_bytes: int = 1 << 20) -> StreamMux:
    return StreamMux(recorder.feed_items, recorder.run_item, max_items, max_bytes)


async def test_one_sessions_plain_feeds_run_in_the_streams_own_task() -> None:
    recorder = Recorder()
    responses, own = await run(mux_for(recorder), *[[feed("a", f"r{i}")] for i in range(4)])
    assert replied(responses) == [(f"r{i}", 1) for i in range(4)]
    assert len(responses) == 4  # a response per message
    assert all(task is own for task in recorder.ran_in.values())


async def test_another_session_hands_the_stream_to_the_multiplexer() -> None:
    recorder = Recorder()
    messages = [[feed("a", "r0")], [feed("a", "r1")], [feed("b", "r2")], [feed("a", "r3")]]
    responses, own = await run(mux_for(recorder), *messages)
    assert sorted(replied(responses)) == [("r0", 1), ("r1", 1), ("r2", 1), ("r3", 1)]
    ran_in = recorder.ran_in
    assert ran_in["r0"] is own and ran_in["r1"] is own
    assert ran_in["r2"] is not own and ran_in["r3"] is not own  # for good, "a" included
    assert len(recorder.lines) == 1  # one Line: "a"'s items keep their order across the switch


async def test_several_items_or_a_generation_hand_it_over_too() -> None:
    recorder = Recorder()
    responses, own = await run(mux_for(recorder), [feed("a", "r0"), feed("b", "r1")])
    assert sorted(replied(responses)) == [("r0", 1), ("r1", 1)]
    assert recorder.ran_in["r0"] is not own

    recorder = Recorder()
    generate = item("a", "g1", tokens(7), generate=types.Sampling(max_tokens=2))
    responses, own = await run(mux_for(recorder), [feed("a", "r0")], [generate], [feed("a", "r2")])
    got = replied(responses)
    assert got[0] == ("r0", 1) and {("g1", 1), ("g1", 2)} <= set(got)
    assert "r2" in {request_id for request_id, _ in got}  # behind g1: run as its own item
    assert recorder.ran_in["r0"] is own
    assert recorder.ran_in["g1"] is not own and recorder.ran_in["r2"] is not own


async def test_an_inline_feeds_error_is_its_reply_and_the_stream_goes_on() -> None:
    recorder = Recorder(failing=frozenset({"r1"}))
    responses, own = await run(mux_for(recorder), *[[feed("a", f"r{i}")] for i in range(3)])
    replies = [r for response in responses for r in response.replies]
    assert [r.request_id for r in replies] == ["r0", "r1", "r2"]
    assert replies[1].error.code == 5 and "not found" in replies[1].error.message  # NOT_FOUND
    assert replies[0].error.code == 0 and replies[2].error.code == 0
    assert all(task is own for task in recorder.ran_in.values())


async def test_a_refused_message_is_answered_by_the_multiplexer() -> None:
    recorder = Recorder()
    too_many = [feed("a", f"x{i}") for i in range(3)]
    responses, _own = await run(mux_for(recorder, max_items=2), [feed("a", "r0")], too_many)
    replies = [r for response in responses for r in response.replies]
    assert [r.request_id for r in replies] == ["r0", "x0", "x1", "x2"]
    assert all(r.error.code == 3 for r in replies[1:])  # INVALID_ARGUMENT, none run
    assert set(recorder.ran_in) == {"r0"}

    recorder = Recorder()  # one item, over the size limit: not fed in the stream's task either
    big = item("a", "big", tokens(*range(200)))
    responses, _own = await run(mux_for(recorder, max_bytes=100), [feed("a", "r0")], [big])
    replies = [r for response in responses for r in response.replies]
    assert [(r.request_id, r.error.code) for r in replies] == [("r0", 0), ("big", 3)]
    assert set(recorder.ran_in) == {"r0"}


async def test_a_first_item_with_an_empty_session_id_counts_as_its_session() -> None:
    recorder = Recorder()
    _responses, own = await run(mux_for(recorder), [feed("", "r0")], [feed("b", "r1")])
    assert recorder.ran_in["r0"] is own and recorder.ran_in["r1"] is not own


async def test_a_client_that_does_not_read_its_replies_is_not_read_further() -> None:
    """Messages keep coming and nobody reads the replies: the stream stops reading (the rest
    wait in gRPC's flow control) once a message's worth of items is unfinished or replied and
    waiting, instead of queueing without bound."""
    pulled = 0

    async def incoming() -> AsyncIterator[pb.StreamRequest]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield pb.StreamRequest(items=[feed("a", f"r{i}-{j}") for j in range(4)])

    responses = mux_for(Recorder(), max_items=8).run(incoming())
    first = await anext(responses)
    for _ in range(200):  # the loop free to read all it would
        await asyncio.sleep(0)
    assert first.replies and pulled <= 8
    await responses.aclose()


async def test_an_error_reply_does_not_echo_an_id_too_long_to_name_anything() -> None:
    """An item whose ids are just under the message limit: its in-band error must not be a
    reply over the limit (which failed the whole stream, the other sessions on it included)."""
    long_id, long_request = "s_" + "x" * 100_000, "r" * 300  # refused, as the engine does
    responses, _ = await run(
        mux_for(Recorder(failing=frozenset({"bad", long_request}))),
        [feed("a", "ok"), item(long_id, "bad", tokens(7))],
        [item("b", long_request, tokens(7)), feed("a", "after")],
    )
    replies = [r for response in responses for r in response.replies]
    bad = next(r for r in replies if r.request_id == "bad")
    assert bad.HasField("error") and bad.session_id == ""
    assert ("after", 1) in replied(responses)
    assert all(len(r.request_id) <= 256 and len(r.session_id) <= 256 for r in replies)


def generation(session_id: str, request_id: str) -> pb.StreamItem:
    it = feed(session_id, request_id)
    it.generate.SetInParent()
    return it


class Generating(Recorder):
    """Generations that yield `tokens` replies each, a tick apart; `produced` counts them."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.produced = 0

    async def run_item(self, it: pb.StreamItem, line: Line) -> AsyncIterator[pb.StreamReply]:
        for position in range(1, self.tokens + 1):
            await asyncio.sleep(0)
            self.produced += 1
            yield pb.StreamReply(
                session_id=it.session_id, request_id=it.request_id, position=position
            )


async def test_running_generations_do_not_keep_the_stream_from_reading_other_items() -> None:
    """More generations running than a message may carry items: a feed for another session
    sent after them is still read and answered while they run (a bound that counted them held
    it until the first generation ended)."""
    recorder = Generating(tokens=10**6)

    async def incoming() -> AsyncIterator[pb.StreamRequest]:
        for k in range(3):
            yield pb.StreamRequest(items=[generation(f"g{k}{j}", f"g{k}{j}") for j in range(8)])
        yield pb.StreamRequest(items=[feed("a", "the-feed")])

    async def until_the_feed_is_answered() -> None:
        async for response in mux_for(recorder, max_items=8).run(incoming()):
            if any(r.request_id == "the-feed" for r in response.replies):
                return

    await asyncio.wait_for(until_the_feed_is_answered(), 10)


async def test_a_client_that_reads_nothing_holds_back_its_generations_tokens() -> None:
    """Nobody reads the replies: the generations' tokens wait for room among the replies
    queued for the writer, instead of 16 generations queueing 2,048 replies each."""
    recorder = Generating(tokens=2048)

    async def incoming() -> AsyncIterator[pb.StreamRequest]:
        for k in range(2):
            yield pb.StreamRequest(items=[generation(f"g{k}{j}", f"g{k}{j}") for j in range(8)])

    responses = mux_for(recorder, max_items=8).run(incoming())
    await anext(responses)
    for _ in range(2000):  # the loop free to run everything it would
        await asyncio.sleep(0)
    assert recorder.produced < 100
    await responses.aclose()


async def test_generations_waiting_for_their_session_hold_the_stream_back() -> None:
    """Generations that have not started (queued behind their session's running one, say)
    hold memory and send nothing: they count, and the stream is read no further (uncounted,
    one stream read 10,000 messages and started 80,000 generation tasks)."""
    read = 0
    gate = asyncio.Event()

    class Waiting(Recorder):
        async def run_item(self, it: pb.StreamItem, line: Line) -> AsyncIterator[pb.StreamReply]:
            await gate.wait()
            yield pb.StreamReply(session_id=it.session_id, request_id=it.request_id, position=1)

    async def incoming() -> AsyncIterator[pb.StreamRequest]:
        nonlocal read
        for k in range(10_000):
            read += 1
            yield pb.StreamRequest(items=[generation("s", f"g{k}-{j}") for j in range(8)])

    responses = mux_for(Waiting(), max_items=8).run(incoming())
    first = asyncio.ensure_future(anext(responses))
    for _ in range(2000):
        await asyncio.sleep(0)
    assert read <= 3
    gate.set()  # they start: a reply each, and the stream reads on
    await asyncio.wait_for(first, 10)
    await responses.aclose()


async def test_a_sessions_later_item_does_not_reply_before_its_earlier_one() -> None:
    """The engine orders a session's items (its lease), but an item behind another can be
    done first: the earlier one's lease goes when its step is done, before its group's replies
    are posted. Its replies still wait for the earlier item's (they came first: over a real
    server, a new session's two items replied at positions 2, then 1)."""

    class SlowGroups(Recorder):
        async def feed_items(self, items: list[pb.StreamItem], line: Line) -> pb.StreamResponse:
            for _ in range(20):  # the group's own hops after its step, drawn out
                await asyncio.sleep(0)
            return await super().feed_items(items, line)

        async def run_item(self, it: pb.StreamItem, line: Line) -> AsyncIterator[pb.StreamReply]:
            yield pb.StreamReply(session_id=it.session_id, request_id=it.request_id, position=2)

    responses, _ = await run(
        mux_for(SlowGroups()), [feed("s", "first"), feed("s", "second"), feed("t", "other")]
    )
    order = [rid for rid, _ in replied(responses)]
    assert order.index("first") < order.index("second"), order


async def test_a_refused_messages_replies_wait_for_their_sessions_earlier_items() -> None:
    """A message refused whole (too many items) is answered at once, but a session's replies
    still keep the order of its items: s's refusals wait for s's earlier feed, t's do not
    (they came first: second, third, fourth, first)."""

    class SlowGroups(Recorder):
        async def feed_items(self, items: list[pb.StreamItem], line: Line) -> pb.StreamResponse:
            for _ in range(20):
                await asyncio.sleep(0)
            return await super().feed_items(items, line)

    responses, _ = await run(
        mux_for(SlowGroups(), max_items=2),
        [feed("s", "first"), feed("t", "other")],
        [feed("s", "second"), feed("u", "new"), feed("s", "third")],
    )
    order = [rid for rid, _ in replied(responses)]
    assert order.index("first") < order.index("second") < order.index("third"), order
    assert order.index("new") < order.index("first"), order  # nothing of u's before it

"""Multiplexing for `SessionService.Stream`: one call carries many sessions.

Each message's items are dispatched as they arrive: the plain feeds (input, no generate) go to
the engine together as one group, each generation runs as its own task, and replies that are
ready together go back in one message. An item's error travels in-band on its reply, so the
stream and the other sessions on it go on.

Order within a session is the session lease's job: the whole stream is one `Line`, so an item
for a session this stream is already using waits its turn instead of being refused. Leases are
taken in the order tasks start (each task takes its leases before it first suspends, or, where
it must await first, the quota or takeover of a shared state tier, takes its place in the
line's order before: `Line.enter`), so tasks are started in item order for each session: a
group is started before any later task for a session in it. A feed for a session with an
unfinished item on this stream runs as its own task, not in a group, so its reply goes out when
it is done and never holds back, or overtakes, the replies of other sessions or of its own
earlier items.

A stream that so far carried one session's plain feeds, one item a message (a client streaming
a session, one token or chunk at a time: the common case) is answered in the stream's own task,
a message at a time: read, fed, answered, then the next read. No reader task, no task per
message, no hand-over through a channel: at 64 such streams on one core, rows per step 51 → 58
(docs/per-core-passes.md, "Sixteenth pass"; CPU per token moved less than this machine's noise).
What such a client sends ahead waits in gRPC's buffers (its flow control, not our memory) until the
reply before it has gone. The first message that is anything else hands the stream to the
multiplexer above for good; nothing of the stream is running at that moment, so no reply can be
overtaken.

A token revoked while the stream is open (`call_auth.Grant`) ends it with UNAUTHENTICATED
before the next message is applied, and before the next reply is sent (the interceptor's
check): generations under way are cancelled with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from google.rpc import status_pb2

from service.api.error_status import answered_status
from service.api.in_band import InBand, error_reply
from service.api.interceptor import check_message_size, check_parsed
from service.api.stream_backlog import Unfinished
from service.engine.channel import Channel
from service.engine.session_line import Line
from service.errors import InvalidArgument, SeqServeError
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.security.call_auth import Grant, current_grant

FeedItems = Callable[[list[pb.StreamItem], Line], Awaitable[pb.StreamResponse]]
RunItem = Callable[[pb.StreamItem, Line], AsyncIterator[pb.StreamReply]]
# What the writer takes: a group's replies in a response of their own, or replies one by one.
_Ready = pb.StreamResponse | list[pb.StreamReply]


class StreamMux:
    def __init__(
        self,
        feed_items: FeedItems,
        run_item: RunItem,
        max_items: int,
        max_bytes: int,
        in_band: InBand | None = None,
    ) -> None:
        self._feed_items = feed_items  # a group of plain feeds → a response, a reply each
        self._run_item = run_item  # any other item → its replies (a generation's tokens)
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._in_band = in_band or InBand()  # errors answered and items counted

    async def run(
        self, messages: AsyncIterable[pb.StreamRequest]
    ) -> AsyncIterator[pb.StreamResponse]:
        line = Line()
        incoming = aiter(messages)
        grant = current_grant.get()  # None: auth is off, or nothing here can be revoked
        # One session's plain feeds, a message at a time, answered right here (the module's
        # docstring); the first message that is anything else goes to the multiplexer.
        session_id: str | None = None  # the one session fed so far
        async for message in incoming:
            check_parsed(message)  # a body that is not a StreamRequest fails the call
            if grant is not None:
                grant.check()  # a revoked token ends the stream: nothing more is applied
            if not self._inline(message, session_id):
                break
            self._in_band.taken(1)
            session_id = message.items[0].session_id
            yield await self._feed_group_now(list(message.items), line)  # one reply: fits
        else:
            return  # the client ended the stream
        async for response in self._multiplex(message, incoming, line, grant):
            yield response

    def _inline(self, message: pb.StreamRequest, session_id: str | None) -> bool:
        """Whether `message` can be answered in the stream's own task: one plain feed (an
        input, no generation) of the one session this stream has fed so far, in a message the
        limits accept. Nothing else of the stream is running then (the messages before were
        answered), so its reply can neither overtake nor hold back another's."""
        items = message.items
        if len(items) != 1:
            return False
        item = items[0]
        return (
            (session_id is None or item.session_id == session_id)
            and item.HasField("input")
            and not item.HasField("generate")
            and self._refusal(message) is None
        )

    async def _feed_group_now(self, items: list[pb.StreamItem], line: Line) -> pb.StreamResponse:
        """The group's response, a reply each (an error's for every item if feeding fails)."""
        try:
            return await self._feed_items(items, line)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return pb.StreamResponse(replies=self._in_band.replies(exc, items))

    async def _multiplex(
        self,
        first: pb.StreamRequest,
        messages: AsyncIterator[pb.StreamRequest],
        line: Line,
        grant: Grant | None,
    ) -> AsyncIterator[pb.StreamResponse]:
        """The stream from `first` on (already read and checked), every message's items
        dispatched as they arrive, replies sent as they are ready. A revoked token (`grant`)
        fails the reader before the message it comes with is taken; the interceptor checks
        the replies."""
        loop = asyncio.get_running_loop()  # once a stream, not once a message
        out: Channel[_Ready | None] = Channel(loop)
        running: set[asyncio.Task[None]] = set()
        unfinished = Unfinished()  # this stream's items not yet replied, by session

        def spawn(work: Coroutine[Any, Any, None]) -> None:
            task = loop.create_task(work)
            running.add(task)
            task.add_done_callback(running.discard)

        def take(message: pb.StreamRequest) -> None:
            self._in_band.taken(len(message.items))
            refusal = self._refusal(message)
            if refusal is not None:
                self._refuse(refusal, list(message.items), out, spawn, unfinished)
            else:
                self._dispatch(list(message.items), line, out, spawn, unfinished)

        async def read() -> None:
            try:
                take(first)
                async for message in messages:
                    check_parsed(message)  # a body that is not a StreamRequest fails the call
                    if grant is not None:
                        grant.check()
                    take(message)
                    # Bounded: no more messages are read (the client's further ones wait in
                    # gRPC's flow control) while a message's worth of items is unfinished or
                    # replies wait for the writer (a client that does not read them).
                    await unfinished.below(self._max_items, out.qsize)
                if running:
                    await asyncio.gather(*list(running), return_exceptions=True)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                batches = [await out.get()]
                while not out.empty():
                    batches.append(out.get_nowait())
                unfinished.wake()  # the replies waiting are the writer's now
                ready = [b for b in batches if b is not None]
                finished = len(ready) < len(batches)  # the reader is done
                alone = ready[0] if len(ready) == 1 else None
                if isinstance(alone, pb.StreamResponse) and self._fits(alone):
                    yield alone  # one group's replies, ready alone: sent as they are
                    ready = []
                replies = [
                    r
                    for batch in ready
                    for r in (batch.replies if isinstance(batch, pb.StreamResponse) else batch)
                ]
                for part in self._fit(replies):
                    yield pb.StreamResponse(replies=part)
                if finished:
                    break
            await asyncio.wait([reader])
            if not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]  # reading failed: the call fails
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _fits(self, response: pb.StreamResponse) -> bool:
        return len(response.replies) <= 1 or not 0 < self._max_bytes < response.ByteSize()

    def _fit(self, replies: list[pb.StreamReply]) -> list[list[pb.StreamReply]]:
        """Replies ready together, in messages that each fit `max_bytes` (each reply alone does:
        the engine refuses a feed whose reply could not, before its step)."""
        if len(replies) <= 1 or self._max_bytes <= 0:
            return [replies] if replies else []
        parts: list[list[pb.StreamReply]] = [[]]
        size = 0
        for reply in replies:
            grow = reply.ByteSize() + 8  # the field's tag and length prefix, generously
            if parts[-1] and size + grow > self._max_bytes:
                parts.append([])
                size = 0
            parts[-1].append(reply)
            size += grow
        return parts

    def _refusal(self, message: pb.StreamRequest) -> SeqServeError | None:
        if len(message.items) > self._max_items:
            err = InvalidArgument(
                f"message carries {len(message.items)} items; the limit is {self._max_items}"
            )
            err.metadata["max_items_per_message"] = str(self._max_items)
            return err
        try:
            check_message_size(message, self._max_bytes)
        except InvalidArgument as exc:
            return exc
        return None

    def _refuse(
        self,
        refusal: SeqServeError,
        items: list[pb.StreamItem],
        out: Channel[_Ready | None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        unfinished: Unfinished,
    ) -> None:
        """A refused message's replies: at once, but those of a session with earlier items
        unfinished after them (a session's replies keep the order of its items)."""
        status = answered_status(refusal)
        self._in_band.count(refusal, len(items))
        waiting = [bool(unfinished.of(item.session_id)) for item in items]
        if not all(waiting):
            now = [it for it, w in zip(items, waiting, strict=True) if not w]
            out.put_nowait([error_reply(it, status) for it in now])
        for item, wait in zip(items, waiting, strict=True):
            if wait:
                turn = unfinished.add(item.session_id)
                spawn(self._refused_in_turn(item, status, turn, out, unfinished))

    async def _refused_in_turn(
        self,
        item: pb.StreamItem,
        status: status_pb2.Status,
        turn: int,
        out: Channel[_Ready | None],
        unfinished: Unfinished,
    ) -> None:
        try:
            await unfinished.turn(item.session_id, turn)
            out.put_nowait([error_reply(item, status)])
        finally:
            unfinished.done(item.session_id)

    def _dispatch(
        self,
        items: list[pb.StreamItem],
        line: Line,
        out: Channel[_Ready | None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        unfinished: Unfinished,
    ) -> None:
        group: list[pb.StreamItem] = []
        in_group: set[str] = set()

        def start_group() -> None:
            if group:
                spawn(self._feed_group(list(group), line, out, unfinished))
                group.clear()
                in_group.clear()

        for item in items:
            sid = item.session_id
            if sid in in_group:  # its earlier item must take the lease first
                start_group()
            plain = item.HasField("input") and not item.HasField("generate")
            if plain and not unfinished.of(sid):  # nothing of its session before it
                group.append(item)
                in_group.add(sid)
                unfinished.add(sid)
            else:
                spawn(self._item(item, line, out, unfinished, unfinished.add(sid)))
        start_group()

    async def _feed_group(
        self,
        items: list[pb.StreamItem],
        line: Line,
        out: Channel[_Ready | None],
        unfinished: Unfinished,
    ) -> None:
        try:
            replies = await self._feed_group_now(items, line)
        finally:
            for item in items:
                unfinished.done(item.session_id)
        out.put_nowait(replies)

    async def _item(
        self,
        item: pb.StreamItem,
        line: Line,
        out: Channel[_Ready | None],
        unfinished: Unfinished,
        turn: int,
    ) -> None:
        """One item that is not in a group: a generation, or an item behind earlier ones of
        its session (its replies wait for theirs: `Unfinished.turn`)."""
        counted = True  # until a generation's first token: waiting, it holds reading back
        generating = item.HasField("generate")
        sid = item.session_id
        try:
            async with contextlib.aclosing(self._run_item(item, line)) as replies:  # type: ignore[type-var]
                async for reply in replies:
                    if counted and generating:
                        counted = False
                        unfinished.started()
                    await unfinished.turn(sid, turn)
                    # A generation's tokens wait while replies pile up for a client that does
                    # not read them: they stay in the generation's own queue (at most its
                    # max_tokens, as for a Generate call), not in this stream's.
                    await unfinished.room(self._max_items, out.qsize)
                    out.put_nowait([reply])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await unfinished.turn(sid, turn)
            out.put_nowait(self._in_band.replies(exc, [item]))
        finally:
            unfinished.done(sid, counted=counted)

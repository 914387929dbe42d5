"""Coalescing feeds: the feeds an app issues concurrently on one client go to the server as
Stream messages, one per routing key per event-loop tick, instead of one Step call each.

An app that awaits 64 `session.feed()` calls at once sends one message with 64 items (the
client gives its sessions one routing key by default, so they share one Stream): the server
steps them as one batch and answers in one message, which is what makes multiplexed frames
several times faster than one call per token. Each feed still gets its own result or its own
error (here the `grpc.aio.AioRpcError` a Step would raise, details included; the client raises
it as the same `service.client.errors` class), and is retried like a Step: same request id,
same expected position, so it applies once.

A Stream that stops answering must not hold its feeds forever (a proxy restarting, a replica
draining or frozen, a connection dead without a reset): each feed has a deadline (the call's
timeout), and a Stream that has had feeds pending for `stall_seconds` without any reply is
declared broken: it is cancelled, its pending feeds fail with UNAVAILABLE (so they are retried,
exactly once, on a fresh Stream) and the next tick opens a new one. A Stream that ends, or
fails, fails its pending feeds the same way.

One feed's fault stays its own. A feed whose item alone is over the channel's message limit
fails alone (RESOURCE_EXHAUSTED, as its Step would), before it is queued. A tick's items go out
in messages under the client's limits (`max_message_bytes`, `max_items_per_message`); a server
whose own limits are lower refuses a message (its items answered INVALID_ARGUMENT, or the
Stream failed RESOURCE_EXHAUSTED when the message is over twice its limit): the client lowers
its limits to the server's and resends those items (UNAVAILABLE: retried) in smaller messages.

A closed client's feeds do not wait forever: those queued or on a Stream are cancelled (as a
Step's call is when its channel closes; those waiting to retry are too, by the client's
`retry.Pauses`), and a feed after `close` raises `grpc.aio.UsageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from service.client.errors import error_from_status
from service.client.message_limits import (
    FRAMING,
    MAX_ITEMS_PER_MESSAGE,
    Entry,
    MessageLimits,
    message_parts,
    wire_size,
)
from service.client.retry import CLIENT_CLOSED
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.sessions.session import ROUTE_HEADER, route_of

STALL_SECONDS = 5.0  # a Stream with feeds pending and no reply for this long is broken
# A watchdog check this share of the stall time late found the event loop held up: one more
# window before the Stream is called broken.
LATE_SHARE = 0.1
IDLE_SECONDS = 60.0  # a routing key's Stream unused this long is ended (many keys: many Streams)


class FeedMux:
    def __init__(
        self,
        stub: pb_grpc.SessionServiceStub,
        *,
        stall_seconds: float = STALL_SECONDS,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_items_per_message: int = MAX_ITEMS_PER_MESSAGE,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._stub = stub
        self._stall = stall_seconds
        self.idle_seconds = idle_seconds
        self._swept = 0.0  # loop time of the last sweep for idle Streams
        self.limits = MessageLimits(
            channel_bytes=max_message_bytes,
            bytes=max_message_bytes - FRAMING,
            items=max_items_per_message,
        )
        self.closed = False  # after `close`: feeds are refused
        self._queued: dict[str, list[tuple[pb.StreamItem, asyncio.Future[pb.StreamReply]]]] = {}
        self._flush_scheduled = False
        self._streams: dict[str, _Stream] = {}
        self.streams_opened = 0  # Stream calls started so far (a broken one is replaced)
        self.on_send: Callable[[int], None] | None = None  # told each message's item count
        # Request ids: a random prefix per client and a counter (uuid4 per feed, a urandom
        # call each, was a sixth of a busy client's CPU).
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:16]

    def request_id(self) -> str:
        """A request id unique to this feed (random per client, then counted)."""
        return f"{self._id_prefix}{next(self._ids):x}"

    async def feed(self, item: pb.StreamItem, timeout: float | None = None) -> pb.StreamReply:
        """Send `item` with the other feeds of this tick; its reply, or its error raised
        (TimeoutError after `timeout` seconds)."""
        if self.closed:  # as a Step on the closed channel: not an error to retry
            raise grpc.aio.UsageError(CLIENT_CLOSED)
        size = wire_size(item)
        if size > self.limits.channel_bytes:  # it alone breaks the Stream: it fails alone
            raise _too_big(size, self.limits.channel_bytes)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[pb.StreamReply] = loop.create_future()
        self._queued.setdefault(route_of(item.session_id), []).append((item, done))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if timeout is None:
            return await done
        timer = loop.call_later(timeout, _expire, done)  # cheaper than a wait_for task
        try:
            return await done
        finally:
            timer.cancel()

    def attempts(self, item: pb.StreamItem) -> Callable[[float | None], Awaitable[pb.StreamReply]]:
        """`item`'s attempts, for the client's retry loop (`RetryPolicy.run`). Once a Stream
        has failed under it, the item may still be running on the server when its resend gets
        there, which refuses it with ABORTED (one request at a time per session); that is
        retried too (as UNAVAILABLE): the resend applies once, or answers the first's reply."""
        resent = False

        async def attempt(timeout: float | None) -> pb.StreamReply:
            nonlocal resent
            try:
                return await self.feed(item, timeout)
            except _StreamFailure:
                resent = True
                raise
            except grpc.aio.AioRpcError as err:
                if resent and err.code() == grpc.StatusCode.ABORTED:
                    raise _unavailable("the item sent before is still running; retry") from err
                raise

        return attempt

    def _flush(self) -> None:
        self._flush_scheduled = False
        queued, self._queued = self._queued, {}
        now = asyncio.get_running_loop().time()
        if now - self._swept > self.idle_seconds:
            self._sweep(now)
        for route, entries in queued.items():
            entries = [(item, done) for item, done in entries if not done.done()]
            if not entries:
                continue
            try:
                self._send(route, entries)
            except Exception as exc:  # in a loop callback: raised to each feed instead
                for _, done in entries:
                    if not done.done():
                        done.set_exception(exc)

    def _send(self, route: str, entries: list[Entry]) -> None:
        stream = self._streams.get(route)
        if stream is None or stream.closed:
            stream = self._streams[route] = _Stream(self._stub, route, self._stall, self.limits)
            self.streams_opened += 1
        for part in message_parts(entries, self.limits.bytes, self.limits.items):
            stream.send(part)
            if self.on_send is not None:
                self.on_send(len(part))

    def _sweep(self, now: float) -> None:
        """End the Streams of routing keys unused for `idle_seconds` (a gateway passing one
        key per user would otherwise keep a Stream open per user it ever served)."""
        self._swept = now
        for route, stream in list(self._streams.items()):
            if stream.closed or stream.idle_since(now) > self.idle_seconds:
                stream.retire()
                del self._streams[route]

    async def close(self) -> None:
        """Refuse new feeds; cancel those queued and those on a Stream (not UNAVAILABLE: they
        would be retried on a channel about to close, and wait forever)."""
        self.closed = True
        queued, self._queued = self._queued, {}
        for entries in queued.values():
            for _, done in entries:
                done.cancel()
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()


class _Stream:
    """One Stream call for one routing key: a writer sending each tick's items as one message,
    a reader handing each reply to the feed that waits for it, a watchdog for a stall."""

    def __init__(
        self, stub: pb_grpc.SessionServiceStub, route: str, stall: float, limits: MessageLimits
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[pb.StreamReply]] = {}
        self._limits = limits
        # The message each pending item went in: its bytes, and whether it had other items.
        self._messages: dict[str, tuple[int, bool]] = {}
        self.closed = False
        self._stall = stall
        self._heard = self._loop.time()  # last reply, or the last send with nothing pending
        self._sent = self._heard  # last send
        self._watchdog: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the watchdog was meant to run
        self._forgiven = -1.0  # the `_heard` of the silence a late check last let go on
        self._call = stub.Stream(self._requests(), metadata=((ROUTE_HEADER, route),))
        self._reader = self._loop.create_task(self._read())

    def idle_since(self, now: float) -> float:
        """Seconds since the last send, or 0 while feeds are pending."""
        return 0.0 if self._waiting else now - self._sent

    def retire(self) -> None:
        """End the call from this side (half-close: the server ends it) with nothing pending."""
        if not self.closed and not self._waiting:
            self.closed = True
            self._outbox.put_nowait(None)

    def send(self, entries: list[tuple[pb.StreamItem, asyncio.Future[pb.StreamReply]]]) -> None:
        self._sent = self._loop.time()
        if not self._waiting:
            self._heard = self._loop.time()
        request = pb.StreamRequest(items=[item for item, _ in entries])
        message = (request.ByteSize(), len(entries) > 1)
        for item, done in entries:
            self._waiting[item.request_id] = done
            self._messages[item.request_id] = message
        self._outbox.put_nowait(request)
        if self._watchdog is None:
            self._arm(self._stall)

    def _arm(self, delay: float) -> None:
        self._watchdog = self._loop.call_later(delay, self._check)
        self._due = self._loop.time() + delay

    def _check(self) -> None:
        """The watchdog: break the Stream if it has had feeds pending, unanswered, too long.
        A check that runs well after its time found the event loop held up (by the
        application, or a busy host): replies that came meanwhile wait for the reader behind
        it, so the silence is not yet the Stream's. It gives the reader one more window, once
        per silence: if nothing is heard by then, the Stream is broken."""
        self._watchdog = None
        if self.closed or not self._waiting:
            return
        now = self._loop.time()
        quiet = now - self._heard
        if quiet < self._stall:
            self._arm(self._stall - quiet)
            return
        if now - self._due > LATE_SHARE * self._stall and self._forgiven != self._heard:
            self._forgiven = self._heard
            self._arm(self._stall)
            return
        self._fail(_unavailable(f"the stream answered nothing for {quiet:.1f}s; retry"))
        self._call.cancel()
        self._reader.cancel()

    def _fail(self, failure: grpc.aio.AioRpcError) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(None)  # the request generator ends
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for done in self._waiting.values():
            if not done.done():
                done.set_exception(failure)  # UNAVAILABLE and the like: feeds retry
        self._waiting.clear()
        self._messages.clear()

    async def _requests(self) -> AsyncIterator[pb.StreamRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        failure: grpc.aio.AioRpcError | None = None
        try:
            async for response in self._call:
                self._heard = self._loop.time()
                for reply in response.replies:
                    self._answer(reply)
        except grpc.aio.AioRpcError as exc:
            failure = self._broken(exc)
        except asyncio.CancelledError:
            failure = _unavailable("the stream was closed")
            raise
        finally:
            self._fail(failure or _unavailable("the stream ended before its reply"))

    def _answer(self, reply: pb.StreamReply) -> None:
        done = self._waiting.pop(reply.request_id, None)
        _, shared = self._messages.pop(reply.request_id, (0, False))
        if done is None or done.done():
            return
        if not reply.HasField("error"):
            done.set_result(reply)
        elif shared and self._limits.learn(reply):  # the message's fault, not the item's
            done.set_exception(_unavailable(f"{reply.error.message}; resent in smaller messages"))
        else:
            done.set_exception(_error(reply.error))

    def _broken(self, exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """The Stream's own failure, for the feeds it carried. A transport break (the server
        or a proxy reset it, or a write failed: INTERNAL or UNKNOWN from the call itself) says
        nothing about the feeds: they are told UNAVAILABLE and retried, within the client's
        retry deadline (exactly once: request ids, expected positions). RESOURCE_EXHAUSTED is a
        message over the server's transport limit: the biggest pending one was, so if that is
        one item it alone gets the error (as its Step would), else messages are made smaller;
        the other feeds are retried. Anything else (UNAUTHENTICATED, ...) is theirs as it is."""
        code = exc.code()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return _unavailable(f"the stream broke ({exc.details()}); retry")
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not self._messages:
            return _StreamFailure(
                code, exc.initial_metadata(), exc.trailing_metadata(), details=exc.details()
            )
        culprit, (size, shared) = max(self._messages.items(), key=lambda kv: kv[1][0])
        if shared:
            self._limits.shrink(size)
        elif (done := self._waiting.pop(culprit, None)) is not None and not done.done():
            done.set_exception(
                grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), exc.details())
            )
        return _unavailable(f"the stream broke ({exc.details()}); resent in smaller messages")

    async def close(self) -> None:
        """End the call; its pending feeds are cancelled (the client is closing)."""
        for done in self._waiting.values():
            done.cancel()
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._reader


def _too_big(size: int, limit: int) -> grpc.aio.AioRpcError:
    """The error a Step of this size gets from the channel, for the one feed that is."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details=f"the feed's message of {size} bytes is over the client's max_message_bytes "
        f"of {limit}; send smaller chunks",
    )


def _expire(done: asyncio.Future[pb.StreamReply]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


def _error(status) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    """A Stream item's in-band error as the exception a Step call would have raised (its
    class decoded here, not serialised into a trailer to be parsed back)."""
    trailing = grpc.aio.Metadata()
    if status.details:
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return error_from_status(status, trailing)


class _StreamFailure(grpc.aio.AioRpcError):
    """A failure of the Stream an item was on (not an answer about the item)."""


def _unavailable(why: str) -> grpc.aio.AioRpcError:
    return _StreamFailure(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=why
    )

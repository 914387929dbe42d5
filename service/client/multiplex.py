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
import itertools
import uuid
from collections.abc import Awaitable, Callable

import grpc

from service.client.feed_stream import FeedStream, StreamFailure, unavailable
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
from service.sessions.session import route_of

STALL_SECONDS = 5.0  # a Stream with feeds pending and no reply for this long is broken
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
        self._streams: dict[str, FeedStream] = {}
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
            except StreamFailure:
                resent = True
                raise
            except grpc.aio.AioRpcError as err:
                if resent and err.code() == grpc.StatusCode.ABORTED:
                    raise unavailable("the item sent before is still running; retry") from err
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
            stream = self._streams[route] = FeedStream(self._stub, route, self._stall, self.limits)
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

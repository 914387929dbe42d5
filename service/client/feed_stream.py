"""One multiplexed Stream call (`FeedMux` keeps one per routing key): each tick's items go out
as one message, a reader hands each reply to the feed waiting for it, and a watchdog declares
the Stream broken when feeds have been pending `stall` seconds with no reply (its pending feeds
fail with UNAVAILABLE, to be retried on a fresh Stream). A watchdog check that runs well after
its time found the event loop held up (by the application, or a busy host): it gives the
reader one more window, once per silence, before calling the Stream broken."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from service.client.errors import error_from_status
from service.client.message_limits import MessageLimits
from service.client.session import route_header
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc

# A watchdog check this share of the stall time late found the event loop held up: one more
# window before the Stream is called broken.
LATE_SHARE = 0.1


class FeedStream:
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
        self._call = stub.Stream(self._requests(), metadata=route_header(route))
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
        self._fail(unavailable(f"the stream answered nothing for {quiet:.1f}s; retry"))
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
            failure = unavailable("the stream was closed")
            raise
        finally:
            self._fail(failure or unavailable("the stream ended before its reply"))

    def _answer(self, reply: pb.StreamReply) -> None:
        done = self._waiting.pop(reply.request_id, None)
        _, shared = self._messages.pop(reply.request_id, (0, False))
        if done is None or done.done():
            return
        if not reply.HasField("error"):
            done.set_result(reply)
        elif shared and self._limits.learn(reply):  # the message's fault, not the item's
            done.set_exception(unavailable(f"{reply.error.message}; resent in smaller messages"))
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
            return unavailable(f"the stream broke ({exc.details()}); retry")
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not self._messages:
            return StreamFailure(
                code, exc.initial_metadata(), exc.trailing_metadata(), details=exc.details()
            )
        culprit, (size, shared) = max(self._messages.items(), key=lambda kv: kv[1][0])
        if shared:
            self._limits.shrink(size)
        elif (done := self._waiting.pop(culprit, None)) is not None and not done.done():
            done.set_exception(
                grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), exc.details())
            )
        return unavailable(f"the stream broke ({exc.details()}); resent in smaller messages")

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


def _error(status) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    """A Stream item's in-band error as the exception a Step call would have raised (its
    class decoded here, not serialised into a trailer to be parsed back)."""
    trailing = grpc.aio.Metadata()
    if status.details:
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return error_from_status(status, trailing)


class StreamFailure(grpc.aio.AioRpcError):
    """A failure of the Stream an item was on (not an answer about the item)."""


def unavailable(why: str) -> grpc.aio.AioRpcError:
    return StreamFailure(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=why
    )

"""A handle on one session: feed it, generate from it, fork, refresh and close it (see
`client.py` for timeouts, retries and errors)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc

from service.client.errors import PositionMismatchError
from service.client.outcome import checked_locally, outcome_unknown, refused_locally
from service.client.results import (
    GeneratedPiece,
    Prediction,
    SessionInfo,
    make_input,
    make_options,
    make_sampling,
    piece_from_pb,
    prediction_from_pb,
    require_str,
    session_from_pb,
    set_field,
)
from service.client.retry import new_request_id
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.sessions.session import ROUTE_HEADER, route_of

if TYPE_CHECKING:
    from service.client.client import SeqServeClient

R = TypeVar("R")
# Ticks a request waits for asyncio to close a generator the app broke out of (two do it: the
# finalizer's task is created in one and runs in the next).
_CLOSE_TICKS = 4


class ClientSession:
    def __init__(self, client: SeqServeClient, info: types.Session) -> None:
        self.client = client
        self.info: SessionInfo = session_from_pb(info)
        self.session_id = info.session_id
        self.metadata = route_metadata(info.session_id)  # on every call: routes to its replica
        # What the server has applied, as far as we know; None after a generation we stopped
        # reading early (the server may have applied a token more): asked again before use.
        self.position: int | None = info.position
        self.closed = False
        # A generation running on this handle (its generator not closed yet), and whether the
        # last one was stopped early (a `break`): see `_settle`.
        self._generating = False
        self._stopped_early = False
        # The last feed, if it failed without a reply (its outcome unknown): its request, with
        # the position it was sent at (see `feed`).
        self._unsettled: pb.StepRequest | pb.StreamItem | None = None

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            await self.close()

    async def feed(
        self,
        text: str | None = None,
        tokens: Sequence[int] | None = None,
        frames: Sequence[float] | None = None,
        *,
        top_k: int = 0,
        timeout: float | None = None,
    ) -> Prediction:
        """Feed one chunk; returns the prediction after its last input. Applied exactly once,
        across retries (see the module docstring), and across calls: a feed that ended without
        its reply (cancelled, timed out, the server unreachable) may or may not have been
        applied; fed again with the same input next (no `generate` in between), it is sent as
        the same request (applied once, or answered with the reply it got the first time); any
        other feed next asks the server where the session is first. Either waits while the
        server is still stepping the feed left (`_settle`)."""
        settling = await self._settle()
        try:  # (not `checked_locally()`: a context manager costs a microsecond per feed)
            inp = make_input(text, tokens, frames)
            options = make_options(top_k)
        except (ValueError, TypeError) as exc:
            raise refused_locally(exc) from None
        mux = self.client.mux
        again = self._again(inp, options)  # the unsettled feed's id, its position restored
        # A resend waits out its first copy's step (busy) but takes no mismatch up: the
        # session moved past it, and sent at the new position it would apply a second time.
        resync = settling and not again
        if self.position is None:
            await self.refresh(timeout=timeout)
        if mux is not None:  # with the other feeds of this tick, in one Stream message
            item = pb.StreamItem(
                session_id=self.session_id,
                request_id=again or mux.request_id(),
                input=inp,
                options=options,
                expected_position=self.position,
            )

            async def stream_it() -> pb.StreamReply:
                item.expected_position = self.position or 0
                return await self.client._retried(
                    mux.attempts(item), timeout=timeout, busy=settling
                )

            try:
                reply = await self._after(resync, stream_it)
            except BaseException as exc:
                self._failed(item, exc)
                raise
            self._unsettled = None
            self.position = reply.position
            return prediction_from_pb(reply.prediction)
        request = pb.StepRequest(
            session_id=self.session_id,
            request_id=again or new_request_id(),
            input=inp,
            options=options,
            expected_position=self.position,
        )

        async def step() -> pb.StepResponse:
            request.expected_position = self.position or 0
            return await self.client._retried(
                lambda left: self.client.sessions.Step(
                    request, metadata=self.metadata, timeout=left
                ),
                timeout=timeout,
                busy=settling,
            )

        try:
            response = await self._after(resync, step)
        except BaseException as exc:
            self._failed(request, exc)
            raise
        self._unsettled = None
        self.position = response.position
        return prediction_from_pb(response.prediction)

    def _again(self, inp: types.Input, options: types.PredictionOptions) -> str:
        """The request id to send `inp` with: the unsettled feed's (see `feed`) if it had the
        same input and options, its position restored (a resend is applied once, or answered
        with its first reply); else "" (a new one), the unsettled feed given up and the
        position asked for again."""
        sent = self._unsettled
        if sent is None:
            return ""
        if sent.input == inp and sent.options == options:
            self.position = sent.expected_position
            return sent.request_id
        self._unsettled, self.position = None, None
        return ""

    def _failed(self, request: pb.StepRequest | pb.StreamItem, exc: BaseException) -> None:
        """After a feed that raised `exc` (a feed that succeeds settles: `_unsettled` None). A
        feed that fails without the server having refused it (no reply: cancelled, timed out,
        unreachable, an internal error) may have been applied: its position is not known any
        more, and it is kept to be sent again as itself (`_again`). A refused resend (the
        session busy with the first, say) stays unsettled; a position mismatch settles it (the
        session moved on past it, and the handle takes the server's position)."""
        if isinstance(exc, PositionMismatchError):
            self._unsettled = None
            return
        if outcome_unknown(exc):
            self._unsettled = request
        # Unknown, or a resend refused (busy, say) while the first may have applied: the
        # position is asked for before the next call that does not resend it.
        if self._unsettled is not None:
            self.position = None

    async def _settle(self) -> bool:
        """Whether this handle left a step the server may still be applying: a generation
        stopped early just now, or a feed that ended without its reply (`_unsettled`). A
        generator the app broke out of (`break` in `async for`) is closed by asyncio a tick or
        two later (its call cancelled then); a request sent before that went out at the
        position last yielded while the server still generated. So a request waits those ticks
        first. Either way the server may still apply the step in flight, holding the session
        until it settles, so the request then waits that out (`_after`: SESSION_BUSY retried,
        and a mismatch then taken up once). A generation still being read elsewhere is not
        waited for (the request gets SESSION_BUSY, as before)."""
        for _ in range(_CLOSE_TICKS):
            if not self._generating:
                break
            await asyncio.sleep(0)
        stopped, self._stopped_early = self._stopped_early, False
        return stopped or self._unsettled is not None

    async def _after(self, settling: bool, send: Callable[[], Awaitable[R]]) -> R:
        """`send()` (resynced on a position mismatch). `settling`: right after this handle left
        a step (a generation stopped early, a feed without its reply), which may land after
        the handle read the position: the request waits while the session is busy (`send`
        retries SESSION_BUSY), and a mismatch then is that step's: taken up, and sent once
        more."""
        # On a PositionMismatchError (another handle fed the session), the handle takes the
        # server's position from it: the failed call is not applied, the next one goes on
        # from there. (Plain try/except, not a context manager: this runs on every feed.)
        try:
            return await send()
        except PositionMismatchError as err:
            self.position = err.position
            if not settling:
                raise
        try:
            return await send()  # at the position the left generation ended at
        except PositionMismatchError as err:
            self.position = err.position
            raise

    async def generate(
        self,
        prompt: str | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        timeout: float | None = None,
    ) -> AsyncGenerator[GeneratedPiece, None]:
        """Unset arguments fall back to the session's default sampling, then the server's.
        Retried like `feed`: a token is yielded once, however often the server resends it.
        `timeout` bounds the whole generation."""
        settling = await self._settle()
        # A feed left unsettled is given up: the generation moves the session on, and a resend
        # at the old position would no longer be a retry of the session's last request.
        self._unsettled = None
        if self.position is None:
            await self.refresh(timeout=timeout)
        with checked_locally():
            request = pb.GenerateRequest(
                session_id=self.session_id,
                request_id=new_request_id(),
                sampling=make_sampling(temperature, top_k, top_p, max_tokens, stop, stop_token_ids),
                expected_position=self.position,
            )
            if prompt is not None:
                request.prompt.CopyFrom(make_input(text=require_str("prompt", prompt)))
        attempts = self.client.retry.attempts(
            timeout=self.client._timeout(timeout), busy=settling, pauses=self.client.pauses
        )
        yielded = 0
        done = False
        self._generating = True
        try:
            while True:
                call = self.client.sessions.Generate(
                    request, metadata=self.metadata, timeout=attempts.seconds_left()
                )
                seen = 0
                failure: grpc.aio.AioRpcError | None = None
                try:
                    async for response in call:
                        seen += 1
                        if seen <= yielded:  # sent again by a retry: already ours
                            continue
                        yielded += 1
                        self.position = response.position
                        yield piece_from_pb(response.token, response.position)
                    done = True
                    return
                except grpc.aio.AioRpcError as err:
                    failure = err
                finally:
                    call.cancel()
                try:
                    await attempts.failed(failure)  # raises, or sleeps before the next attempt
                except PositionMismatchError as err:
                    if not settling or yielded:
                        raise
                    settling = False  # the left generation's last step landed: from there
                    self.position = request.expected_position = err.position
        finally:
            self._generating = False
            if not done:  # stopped early: the server may have applied a token more
                self.position = None
                self._stopped_early = True

    async def fork(self, *, seed: int | None = None, timeout: float | None = None) -> ClientSession:
        """A new session with a copy of this one's state (and random stream, unless `seed`)."""
        request = pb.ForkSessionRequest(session_id=self.session_id, request_id=new_request_id())
        with checked_locally():
            set_field(request, "seed", seed, "an int")
        settling = await self._settle()  # a generation stopped just now: its last step first
        response = await self.client._retried(
            lambda left: self.client.sessions.ForkSession(
                request, metadata=self.metadata, timeout=left
            ),
            timeout=timeout,
            busy=settling,
        )
        return ClientSession(self.client, response.session)

    async def refresh(self, *, timeout: float | None = None) -> SessionInfo:
        """The session as the server has it now (position, expiry, state, ...)."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        response = await self.client._retried(
            lambda left: self.client.sessions.GetSession(
                request, metadata=self.metadata, timeout=left
            ),
            timeout=timeout,
        )
        self.info = session_from_pb(response.session)
        self.position = self.info.position
        return self.info

    async def close(self, *, timeout: float | None = None) -> None:
        """End the session. Not retried when the server may have closed it (a second close
        would be refused), but while it is busy (SESSION_BUSY: a generation this client left,
        or one running elsewhere, goes on until its next step) it waits, with the retry
        policy's backoff and deadline, so leaving `async with` after a generation loop was
        broken off closes the session instead of raising SessionBusyError."""
        request = pb.CloseSessionRequest(session_id=self.session_id)
        await self._settle()  # a generation just stopped: its call cancelled first
        await self.client._retried(
            lambda left: self.client.sessions.CloseSession(
                request, metadata=self.metadata, timeout=left
            ),
            timeout=timeout,
            retry=False,
            busy=True,
        )
        self.closed = True


def route_metadata(session_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call on `session_id` (for a Stream: one per routing key)."""
    return route_header(route_of(session_id))


def route_header(route: str) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call by `route`. None for a key no header can carry (not
    printable ASCII: no session has one; gRPC would fail the call with its own error), so the
    server answers the session id as any it does not hold."""
    if not route.isascii() or not route.isprintable():
        return ()
    return ((ROUTE_HEADER, route),)

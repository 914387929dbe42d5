"""gRPC glue for `seqserve.v1.SessionService`: protobuf in, engine call, protobuf out.

Errors are mapped to statuses in one place (`service.api.interceptor`), except in `Stream`,
whose multiplexing lives in `stream_mux`: there an item's error travels in-band on its reply.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator

from google.rpc import status_pb2

from service.api import convert, reply_wire
from service.api.error_status import answered_status
from service.api.in_band import InBand, ItemCounts, error_reply
from service.api.interceptor import checks_its_requests
from service.api.stream_mux import StreamMux
from service.engine.session_engine import Feed, FeedOutcome, Line, SessionEngine
from service.errors import InvalidArgument, SeqServeError
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2
from service.sessions.session import ROUTE_HEADER, Session


class SessionServicer(pb_grpc.SessionServiceServicer):
    def __init__(
        self,
        engine: SessionEngine,
        *,
        max_items_per_message: int,
        max_message_bytes: int,
        item_counts: ItemCounts | None = None,
    ) -> None:
        self.engine = engine
        self._in_band = InBand(item_counts)  # Stream items' errors, answered and counted
        self._mux = StreamMux(
            self._feed_items,
            self._run_item,
            max_items_per_message,
            max_message_bytes,
            self._in_band,
        )

    def _session_pb(self, session: Session) -> types_pb2.Session:
        return convert.session_to_pb(session, self.engine.sessions.clock(), time.time())

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        session, outcome = await self.engine.create_session(
            request.model,
            request.version,
            seed=request.seed if request.HasField("seed") else None,
            ttl_seconds=convert.ttl_seconds(request),
            default_sampling=convert.sampling_from_pb(request.default_sampling),
            prefix=convert.input_from_pb(request.prefix) if request.HasField("prefix") else None,
            options=convert.options_from_pb(request.options),
            request_id=request.request_id,
            route=_metadata(context, ROUTE_HEADER),
        )
        response = pb.CreateSessionResponse(session=self._session_pb(session))
        if outcome is not None and not request.options.skip:
            _fill_prediction(response, outcome)
        return response

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        session = await self.engine.describe_session(request.session_id)
        return pb.GetSessionResponse(session=self._session_pb(session))

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        session = await self.engine.close_session(request.session_id)
        return pb.CloseSessionResponse(session=self._session_pb(session))

    async def ForkSession(self, request, context):  # type: ignore[no-untyped-def]
        child = await self.engine.fork_session(
            request.session_id,
            ttl_seconds=convert.ttl_seconds(request),
            seed=request.seed if request.HasField("seed") else None,
            request_id=request.request_id,
        )
        return pb.ForkSessionResponse(session=self._session_pb(child))

    async def Step(self, request, context):  # type: ignore[no-untyped-def]
        return await self._feed_one(request, pb.StepResponse)

    async def _feed_one(self, request, reply_type, line: Line | None = None):  # type: ignore[no-untyped-def]
        """One feed (a `StepRequest`, or a `StreamItem` waiting behind its session's earlier
        items) → its reply of `reply_type` (`StepResponse` / `StreamReply`)."""
        outcome = await self.engine.feed(
            request.session_id,
            convert.input_from_pb(request.input),
            convert.options_from_pb(request.options),
            line,
            expected_position=_expected(request),
            request_id=request.request_id,
        )
        reply = reply_type(
            session_id=request.session_id, request_id=request.request_id, position=outcome.position
        )
        if not request.options.skip:
            _fill_prediction(reply, outcome)
        return reply

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:  # type: ignore[no-untyped-def]
        tokens = self._generate(
            request.session_id,
            request.prompt if request.HasField("prompt") else None,
            request.sampling if request.HasField("sampling") else None,
            None,
            _expected(request),
            request.request_id,
        )
        async with contextlib.aclosing(tokens) as stream:  # type: ignore[type-var]
            async for token in stream:
                response = pb.GenerateResponse(
                    session_id=request.session_id, position=token.position
                )
                convert.fill_token(response.token, token)
                yield response

    @checks_its_requests  # StreamMux checks each message as it reads it
    async def Stream(self, request_iterator, context) -> AsyncIterator[pb.StreamResponse]:  # type: ignore[no-untyped-def]
        async for response in self._mux.run(request_iterator):
            yield response

    # ---- Stream items ------------------------------------------------------------------------

    async def _feed_items(self, items: list[pb.StreamItem], line: Line) -> pb.StreamResponse:
        """Plain feeds of one message: one engine call for all, one reply each, in order, in
        one response parsed from the replies' wire bytes (`reply_wire`: cheaper than building
        them field by field)."""
        refused: dict[int, SeqServeError] = {}
        feeds: list[Feed] = []
        heads: list[tuple[str, str, bool]] = []  # session id, request id, skip: read once
        for k, item in enumerate(items):
            session_id, request_id, options = item.session_id, item.request_id, item.options
            heads.append((session_id, request_id, options.skip))
            try:
                inp = convert.input_from_pb(item.input)
            except SeqServeError as exc:
                refused[k] = exc.detached()
                continue
            feeds.append(
                Feed(
                    session_id,
                    inp,
                    convert.options_from_pb(options),
                    _expected(item),
                    request_id,
                )
            )
        outcomes = iter(await self.engine.feed_many(feeds, line) if feeds else ())
        entries: list[bytes] = []
        # Each error's status (one error id however many items it refused), and its items.
        answered: dict[int, tuple[status_pb2.Status, SeqServeError, int]] = {}
        for k, (session_id, request_id, skip) in enumerate(heads):
            outcome = refused[k] if k in refused else next(outcomes)
            if isinstance(outcome, SeqServeError):
                status, _, count = answered.get(id(outcome)) or (answered_status(outcome), 0, 0)
                answered[id(outcome)] = (status, outcome, count + 1)
                error = error_reply(items[k], status)
                entries.append(reply_wire.message_entry(error.SerializeToString()))
            elif outcome.per_position:
                reply = pb.StreamReply(
                    session_id=session_id, request_id=request_id, position=outcome.position
                )
                if not skip:
                    _fill_prediction(reply, outcome)
                entries.append(reply_wire.message_entry(reply.SerializeToString()))
            else:
                prediction = None if skip else outcome.prediction
                entries.append(
                    reply_wire.feed_reply(
                        session_id, request_id, outcome.position, prediction, outcome.tokenizer
                    )
                )
        response = pb.StreamResponse()
        response.MergeFromString(b"".join(entries))
        for _, refusal, count in answered.values():  # counted once answered (a failure
            self._in_band.count(refusal, count)  # above answers every item, and counts it)
        return response

    async def _run_item(self, item: pb.StreamItem, line: Line) -> AsyncIterator[pb.StreamReply]:
        """An item on its own: a generation (with an optional prompt in `input`), one reply per
        token; or a feed that waits behind this stream's earlier items for its session."""
        if not item.HasField("generate"):
            if not item.HasField("input"):
                raise InvalidArgument("stream item has neither input nor generate")
            yield await self._feed_one(item, pb.StreamReply, line)
            return
        prompt = item.input if item.HasField("input") else None
        tokens = self._generate(
            item.session_id,
            prompt,
            item.generate.sampling,
            line,
            _expected(item),
            item.request_id,
        )
        async with contextlib.aclosing(tokens) as stream:  # type: ignore[type-var]
            async for token in stream:
                reply = pb.StreamReply(
                    session_id=item.session_id,
                    request_id=item.request_id,
                    position=token.position,
                )
                convert.fill_token(reply.token, token)
                yield reply

    async def _generate(self, session_id, prompt_pb, sampling_pb, line, expected, request_id):  # type: ignore[no-untyped-def]
        """The engine's token stream; sampling fields the request leaves unset fall back to
        the session's defaults (the holder's: the engine reads them once it has the session,
        so nothing here awaits before the engine takes the item's place in its line)."""
        sampling = None
        if sampling_pb is not None:
            sampling = functools.partial(convert.sampling_from_pb, sampling_pb)
        prompt = convert.input_from_pb(prompt_pb) if prompt_pb is not None else None
        tokens = self.engine.generate(
            session_id, prompt, sampling, line, expected_position=expected, request_id=request_id
        )
        async with contextlib.aclosing(tokens) as stream:  # type: ignore[type-var]
            async for token in stream:
                yield token


def _metadata(context, key: str) -> str:  # type: ignore[no-untyped-def]
    """The call's metadata value for `key` ("" when absent)."""
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return str(item.value)
    return ""


def _expected(request) -> int | None:  # type: ignore[no-untyped-def]
    """A request's `expected_position`, None when unset."""
    return request.expected_position if request.HasField("expected_position") else None


def _fill_prediction(response, outcome: FeedOutcome) -> None:  # type: ignore[no-untyped-def]
    convert.fill_prediction(
        response.prediction, outcome.prediction, outcome.position, outcome.tokenizer
    )
    if outcome.per_position:
        response.per_position.extend(
            convert.per_position_to_pb(outcome.per_position, outcome.position, outcome.tokenizer)
        )

"""gRPC glue for `seqserve.v1.SessionService`: protobuf in, engine call, protobuf out.

Errors are mapped to statuses in one place (`service.api.interceptor`), except in `Stream`,
where an item's error travels in-band on its reply so the stream and other sessions go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from google.rpc import status_pb2

from service.api import convert
from service.api.gen.seqserve.v1 import session_service_pb2 as pb
from service.api.gen.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.api.interceptor import check_message_size, status_of
from service.engine.session_engine import SessionEngine, StepOutcome
from service.errors import InvalidArgument, SeqServeError
from service.runtime.sampler import SamplingParams
from service.sessions.session import Session

log = logging.getLogger(__name__)


class SessionServicer(pb_grpc.SessionServiceServicer):
    def __init__(self, engine: SessionEngine) -> None:
        self.engine = engine

    def _session_pb(self, session: Session):  # type: ignore[no-untyped-def]
        return convert.session_to_pb(session, self.engine.sessions.clock(), time.time())

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        session, outcome = await self.engine.create_session(
            request.model,
            request.version,
            seed=request.seed if request.HasField("seed") else None,
            ttl_seconds=convert.duration_seconds(request.ttl),
            default_sampling=convert.sampling_from_pb(request.default_sampling, SamplingParams()),
            prefix=convert.input_from_pb(request.prefix) if request.HasField("prefix") else None,
            options=convert.options_from_pb(request.options),
        )
        response = pb.CreateSessionResponse(session=self._session_pb(session))
        if outcome is not None and not request.options.skip:
            self._fill_prediction(response, outcome)
        return response

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetSessionResponse(
            session=self._session_pb(self.engine.get_session(request.session_id))
        )

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        session = await self.engine.close_session(request.session_id)
        return pb.CloseSessionResponse(session=self._session_pb(session))

    async def ForkSession(self, request, context):  # type: ignore[no-untyped-def]
        child = await self.engine.fork_session(
            request.session_id,
            ttl_seconds=convert.duration_seconds(request.ttl),
            seed=request.seed if request.HasField("seed") else None,
        )
        return pb.ForkSessionResponse(session=self._session_pb(child))

    async def Step(self, request, context):  # type: ignore[no-untyped-def]
        outcome = await self.engine.step(
            request.session_id,
            convert.input_from_pb(request.input),
            convert.options_from_pb(request.options),
        )
        response = pb.StepResponse(
            session_id=request.session_id, request_id=request.request_id, position=outcome.position
        )
        if not request.options.skip:
            self._fill_prediction(response, outcome)
        return response

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:  # type: ignore[no-untyped-def]
        async for token in self._generate(
            request.session_id,
            request.prompt if request.HasField("prompt") else None,
            request.sampling if request.HasField("sampling") else None,
        ):
            yield pb.GenerateResponse(
                session_id=request.session_id,
                position=token.position,
                token=convert.token_to_pb(token),
            )

    async def Stream(self, request_iterator, context) -> AsyncIterator[pb.StreamResponse]:  # type: ignore[no-untyped-def]
        """Items run concurrently across sessions and in order within a session; replies that
        are ready together go back in one message."""
        out: asyncio.Queue[pb.StreamReply | None] = asyncio.Queue()
        tails: dict[str, asyncio.Task[None]] = {}
        running: set[asyncio.Task[None]] = set()
        cap = self.engine.settings.engine.max_items_per_message
        max_bytes = self.engine.settings.server.max_message_bytes

        async def read() -> None:
            try:
                async for message in request_iterator:
                    refusal: SeqServeError | None = None
                    if len(message.items) > cap:
                        refusal = InvalidArgument(
                            f"message carries {len(message.items)} items; the limit is {cap}"
                        )
                    else:
                        try:
                            check_message_size(message, max_bytes)
                        except InvalidArgument as exc:
                            refusal = exc
                    # A message's plain feeds (input, no generate, session not already queued
                    # on this stream) go to the engine together as one group.
                    feeds: list[pb.StreamItem] = []
                    feeds_task: asyncio.Task[None] | None = None
                    for item in message.items:
                        if refusal is not None:
                            out.put_nowait(_error_reply(item, refusal))
                            continue
                        if (
                            item.session_id not in tails
                            and item.HasField("input")
                            and not item.HasField("generate")
                        ):
                            if feeds_task is None:  # starts once this loop yields: sees all
                                feeds_task = asyncio.create_task(self._stream_feeds(feeds, out))
                                running.add(feeds_task)
                                feeds_task.add_done_callback(running.discard)
                            feeds.append(item)
                            tails[item.session_id] = feeds_task
                            feeds_task.add_done_callback(_forget_tail(tails, item.session_id))
                            continue
                        prev = tails.get(item.session_id)
                        task = asyncio.create_task(self._stream_item(item, prev, out))
                        tails[item.session_id] = task
                        running.add(task)
                        task.add_done_callback(running.discard)
                        task.add_done_callback(_forget_tail(tails, item.session_id))
                if running:
                    await asyncio.gather(*list(running), return_exceptions=True)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                first = await out.get()
                replies = [first]
                while not out.empty():
                    replies.append(out.get_nowait())
                done = None in replies
                batch = [r for r in replies if r is not None]
                if batch:
                    yield pb.StreamResponse(replies=batch)
                if done:
                    break
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _stream_feeds(
        self, items: list[pb.StreamItem], out: asyncio.Queue[pb.StreamReply | None]
    ) -> None:
        """Plain feeds of one message, for distinct sessions: one engine call for all."""
        replies: list[pb.StreamReply | None] = [None] * len(items)
        requests = []
        accepted: list[int] = []
        for k, item in enumerate(items):
            try:
                inp = convert.input_from_pb(item.input)
            except SeqServeError as exc:
                replies[k] = _error_reply(item, exc)
                continue
            requests.append((item.session_id, inp, convert.options_from_pb(item.options)))
            accepted.append(k)
        outcomes: list[StepOutcome | BaseException]
        try:
            outcomes = list(await self.engine.step_many(requests)) if requests else []
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcomes = [exc] * len(requests)
        for k, outcome in zip(accepted, outcomes, strict=True):
            item = items[k]
            if isinstance(outcome, BaseException):
                replies[k] = _error_reply(item, outcome)
                continue
            reply = pb.StreamReply(
                session_id=item.session_id, request_id=item.request_id, position=outcome.position
            )
            if not item.options.skip:
                self._fill_prediction(reply, outcome)
            replies[k] = reply
        for done in replies:
            out.put_nowait(done)

    async def _stream_item(
        self,
        item: pb.StreamItem,
        prev: asyncio.Task[None] | None,
        out: asyncio.Queue[pb.StreamReply | None],
    ) -> None:
        if prev is not None:  # same session earlier on this stream: finish that first
            with contextlib.suppress(Exception):
                await asyncio.shield(prev)
        try:
            if item.HasField("generate"):
                async for token in self._generate(
                    item.session_id,
                    item.input if item.HasField("input") else None,
                    item.generate.sampling,
                ):
                    out.put_nowait(
                        pb.StreamReply(
                            session_id=item.session_id,
                            request_id=item.request_id,
                            position=token.position,
                            token=convert.token_to_pb(token),
                        )
                    )
            elif item.HasField("input"):
                outcome = await self.engine.step(
                    item.session_id,
                    convert.input_from_pb(item.input),
                    convert.options_from_pb(item.options),
                )
                reply = pb.StreamReply(
                    session_id=item.session_id,
                    request_id=item.request_id,
                    position=outcome.position,
                )
                if not item.options.skip:
                    self._fill_prediction(reply, outcome)
                out.put_nowait(reply)
            else:
                raise InvalidArgument("stream item has neither input nor generate")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            out.put_nowait(_error_reply(item, exc))

    async def _generate(self, session_id, prompt_pb, sampling_pb):  # type: ignore[no-untyped-def]
        session = self.engine.get_session(session_id)
        sampling = (
            convert.sampling_from_pb(sampling_pb, session.default_sampling)
            if sampling_pb is not None
            else None
        )
        prompt = convert.input_from_pb(prompt_pb) if prompt_pb is not None else None
        tokens = self.engine.generate(session_id, prompt, sampling)
        async with contextlib.aclosing(tokens) as gen:  # type: ignore[type-var]
            async for token in gen:
                yield token

    @staticmethod
    def _fill_prediction(response, outcome: StepOutcome) -> None:  # type: ignore[no-untyped-def]
        convert.fill_prediction(
            response.prediction, outcome.prediction, outcome.position, outcome.tokenizer
        )
        if outcome.per_position:
            response.per_position.extend(
                convert.per_position_to_pb(
                    outcome.per_position, outcome.position, outcome.tokenizer
                )
            )


def _forget_tail(
    tails: dict[str, asyncio.Task[None]], session_id: str
) -> Callable[[asyncio.Task[None]], None]:
    """Drop a session's tail once its last queued item is done, so the map stays small."""

    def forget(task: asyncio.Task[None]) -> None:
        if tails.get(session_id) is task:
            del tails[session_id]

    return forget


def _error_reply(item: pb.StreamItem, exc: BaseException) -> pb.StreamReply:
    code, message = status_of(exc)
    return pb.StreamReply(
        session_id=item.session_id,
        request_id=item.request_id,
        error=status_pb2.Status(code=code.value[0], message=message),
    )

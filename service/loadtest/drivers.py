"""The closed loops that put load on the server.

A `StreamGroupDriver` owns one bidirectional `Stream` and K sessions (K = `multiplex`; 1 gives
one stream per session). Each tick it sends one frame carrying one item per session, reads
replies until every item has its answer, then thinks. A turn that generates runs either as a
generate item in the same frame or as its own `Generate` call, alongside the frame.

Failures are counted, never raised: an in-band item error by its code; a stream that dies fails
its outstanding items with the stream's code, and the next tick opens a new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import grpc

from service.client.client import route_metadata
from service.loadtest.config import LoadConfig
from service.loadtest.recorder import LoadRecorder
from service.loadtest.target import ModelInfo, status_name
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types

_RETRY_PAUSE_SECONDS = 0.05  # after a dead stream, so a down server is not hammered


@dataclass
class ClientSession:
    """The load generator's view of one session."""

    session_id: str
    rng: random.Random
    created: bool = True  # False for the deliberately invalid ids


@dataclass
class _Pending:
    """An item sent and not yet fully answered."""

    session: ClientSession
    inputs: int
    generate: bool
    last_token_at: float | None = None


@dataclass
class _Turn:
    items: list[pb.StreamItem] = field(default_factory=list)
    pending: dict[str, _Pending] = field(default_factory=dict)
    rpc_generations: list[tuple[ClientSession, types.Input]] = field(default_factory=list)


class StreamGroupDriver:
    def __init__(
        self,
        stub: pb_grpc.SessionServiceStub,
        sessions: list[ClientSession],
        config: LoadConfig,
        model: ModelInfo,
        recorder: LoadRecorder,
        stop: asyncio.Event,
    ) -> None:
        self._stub = stub
        self._sessions = sessions
        self._config = config
        self._model = model
        self._recorder = recorder
        self._stop = stop
        self._rng = random.Random(sessions[0].rng.random())  # think times of this group
        self._route = route_metadata(sessions[0].session_id)  # the group shares a routing key
        self._tick = 0
        self._generates = model.input_kind == "tokens" and config.generate_fraction > 0
        self._options = types.PredictionOptions(top_k=config.top_k)
        self._sampling = types.Sampling(
            max_tokens=config.max_tokens, temperature=config.temperature
        )

    async def run(self) -> None:
        call: grpc.aio.StreamStreamCall | None = None
        try:
            while not self._stop.is_set():
                turn = self._plan()
                rpcs = [
                    asyncio.create_task(self._generate_rpc(s, prompt))
                    for s, prompt in turn.rpc_generations
                ]
                try:
                    if turn.items:
                        if call is None:
                            call = self._stub.Stream(metadata=self._route)
                        if not await self._exchange(call, turn):
                            call.cancel()
                            call = None
                            await self._pause(_RETRY_PAUSE_SECONDS)
                finally:
                    if rpcs:
                        await asyncio.gather(*rpcs)
                if self._config.think_ms > 0:
                    mean = self._config.think_ms / 1000.0
                    await self._pause(self._rng.uniform(0.5 * mean, 1.5 * mean))
        finally:
            if call is not None:
                await _finish_stream(call)

    def _plan(self) -> _Turn:
        """One item (or Generate call) per session for this tick."""
        turn = _Turn()
        self._tick += 1
        cfg = self._config
        for j, s in enumerate(self._sessions):
            generate = self._generates and s.rng.random() < cfg.generate_fraction
            inputs = self._model.random_input(s.rng, cfg.tokens_per_message)
            if generate and cfg.generate_via == "rpc":
                turn.rpc_generations.append((s, inputs))
                continue
            request_id = f"{self._tick}.{j}"
            item = pb.StreamItem(session_id=s.session_id, request_id=request_id, input=inputs)
            if generate:
                item.generate.sampling.CopyFrom(self._sampling)
            else:
                item.options.CopyFrom(self._options)
            turn.items.append(item)
            turn.pending[request_id] = _Pending(s, cfg.tokens_per_message, generate)
        return turn

    async def _exchange(self, call: grpc.aio.StreamStreamCall, turn: _Turn) -> bool:
        """Send the frame and read until every item is answered. False if the stream died."""
        rec, pending = self._recorder, turn.pending
        sent = time.perf_counter()
        try:
            await call.write(pb.StreamRequest(items=turn.items))
            rec.message_sent(sent, len(turn.items))
            while pending:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise asyncio.InvalidStateError("server ended the stream")
                now = time.perf_counter()
                for reply in response.replies:
                    self._on_reply(reply, pending, sent, now)
        except grpc.aio.AioRpcError as exc:
            self._fail(pending, exc.code(), exc.details())
            return False
        except asyncio.InvalidStateError:  # the call had already ended: report its status
            code = await call.code()
            details = await call.details()
            self._fail(pending, code, details or "server ended the stream with items unanswered")
            return False
        return True

    def _fail(
        self, pending: dict[str, _Pending], code: grpc.StatusCode | None, details: str | None
    ) -> None:
        """Every unanswered item of a dead stream fails with the stream's status."""
        name = "UNKNOWN" if code is None or code == grpc.StatusCode.OK else code.name
        now = time.perf_counter()
        for _ in pending:
            self._recorder.error("stream", name, details or "stream failed", now)

    def _on_reply(
        self, reply: pb.StreamReply, pending: dict[str, _Pending], sent: float, now: float
    ) -> None:
        item = pending.get(reply.request_id)
        if item is None:  # not ours (cannot happen with a correct server)
            return
        rec = self._recorder
        if reply.error.code:
            rec.error("stream", status_name(reply.error.code), reply.error.message, now)
            del pending[reply.request_id]
        elif not item.generate:
            rec.fed(sent, now, item.inputs)
            del pending[reply.request_id]
        elif reply.HasField("token"):
            first = item.last_token_at is None
            if first:
                rec.prompt_fed(now, item.inputs)
            rec.token(sent if item.last_token_at is None else item.last_token_at, now, first)
            item.last_token_at = now
            if reply.token.finish_reason != types.FINISH_REASON_UNSPECIFIED:
                rec.generation_finished(now)
                del pending[reply.request_id]

    async def _generate_rpc(self, session: ClientSession, prompt: types.Input) -> None:
        sent = time.perf_counter()
        self._recorder.message_sent(sent, 0)
        await generate_rpc(
            self._stub, session, prompt, self._sampling, self._recorder, sent,
            self._config.tokens_per_message,
        )  # fmt: skip

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)


async def generate_rpc(
    stub: pb_grpc.SessionServiceStub,
    session: ClientSession,
    prompt: types.Input,
    sampling: types.Sampling,
    rec: LoadRecorder,
    sent: float,
    prompt_tokens: int,
) -> None:
    """One `Generate` call, its time to first token measured from `sent`."""
    request = pb.GenerateRequest(session_id=session.session_id, prompt=prompt, sampling=sampling)
    last: float | None = None
    call = stub.Generate(request, metadata=route_metadata(session.session_id))
    try:
        async for response in call:
            now = time.perf_counter()
            if last is None:
                rec.prompt_fed(now, prompt_tokens)
            rec.token(sent if last is None else last, now, last is None)
            last = now
            if response.token.finish_reason != types.FINISH_REASON_UNSPECIFIED:
                rec.generation_finished(now)
    except grpc.aio.AioRpcError as exc:
        rec.error("generate", exc.code().name, exc.details() or "", time.perf_counter())
    finally:
        call.cancel()


async def _finish_stream(call: grpc.aio.StreamStreamCall) -> None:
    """Half-close and let the server end the stream; cancel it if it will not. The stream's
    outcome is already counted: a half-close that fails because the call has just ended (gRPC
    raises its own `ExecuteBatchError` for that, not an `AioRpcError`: grpc/grpc#24758) is
    no error of the load's."""
    try:
        await call.done_writing()
        await asyncio.wait_for(call.code(), 2.0)
    except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
        pass
    except Exception as exc:  # gRPC's internal errors (cygrpc's InternalError family)
        if not type(exc).__module__.startswith("grpc"):
            raise
    finally:
        call.cancel()

"""An asyncio client for seqserve.

    async with SeqServeClient("127.0.0.1:50051") as client:
        session = await client.create_session("bytes-lstm", seed=7)
        first = await session.feed(text="def ")
        async for piece in session.generate(max_tokens=40, temperature=0.8):
            print(piece.text, end="")
        await session.close()

Errors arrive as `grpc.aio.AioRpcError` carrying the server's status code and message.

Exactly once across crashes: every feed, generation, creation and fork carries a request id,
and feeds and generations the position the session is expected at. When the server is
unreachable (UNAVAILABLE: restarting, draining, its disk refusing writes) the client retries
the same request with the same id and position, within its `RetryPolicy`; the server applies
it if it had not, or answers with the original reply if it had (a generation resends the
tokens it applied and goes on; the client yields each token once). So an app that calls
`session.feed(...)` across a server crash and restart sees each input applied exactly once.

Routing: every call carries the session's routing key as `x-seqserve-route` metadata, so a
load balancer that hashes it (nginx, ingress-nginx; see the README) sends all calls of a
session to one replica. A new session's key is the one given to `create_session`, else the
client's `route_key`, else a random one; it is part of the session id from then on.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration

from service.client.credentials import Credentials
from service.client.multiplex import FeedMux
from service.client.retry import RetryPolicy, new_request_id, retryable
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.sessions.session import ROUTE_HEADER, route_of


@dataclass(frozen=True)
class TokenPrediction:
    """What the session predicts after its last input."""

    position: int
    top: list[tuple[int, float, str]]  # (token id, probability, text), most likely first
    values: list[float]  # regression output (empty for token models)


@dataclass(frozen=True)
class GeneratedPiece:
    token_id: int
    text: str
    position: int
    finish_reason: str | None  # "stop_token" | "stop_string" | "max_tokens" on the last


def make_input(
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    frames: Sequence[float] | None = None,
) -> types.Input:
    if sum(x is not None for x in (text, tokens, frames)) != 1:
        raise ValueError("give exactly one of text, tokens or frames")
    if text is not None:
        return types.Input(text=text)
    if tokens is not None:
        return types.Input(tokens=types.Tokens(ids=list(tokens)))
    return types.Input(frames=types.Frames(values=list(frames or ())))


def make_sampling(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
) -> types.Sampling:
    msg = types.Sampling(stop_strings=list(stop), stop_token_ids=list(stop_token_ids))
    if temperature is not None:
        msg.temperature = temperature
    if top_k is not None:
        msg.top_k = top_k
    if top_p is not None:
        msg.top_p = top_p
    if max_tokens is not None:
        msg.max_tokens = max_tokens
    return msg


def prediction_from_pb(msg: types.Prediction) -> TokenPrediction:
    if msg.WhichOneof("kind") == "regression":
        return TokenPrediction(msg.position, [], list(msg.regression.values))
    return TokenPrediction(msg.position, [(t.id, t.prob, t.text) for t in msg.tokens.top], [])


_FINISH = {
    types.FINISH_REASON_UNSPECIFIED: None,
    types.FINISH_REASON_STOP_TOKEN: "stop_token",
    types.FINISH_REASON_STOP_STRING: "stop_string",
    types.FINISH_REASON_MAX_TOKENS: "max_tokens",
}


def piece_from_pb(token: types.GeneratedToken, position: int) -> GeneratedPiece:
    return GeneratedPiece(token.id, token.text, position, _FINISH[token.finish_reason])


class SeqServeClient:
    def __init__(
        self,
        target: str,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        retry: RetryPolicy | None = None,
        route_key: str | None = None,
        credentials: Credentials | None = None,
        multiplex: bool = False,
    ) -> None:
        """`credentials`: a token and TLS (default: the token in SEQSERVE_TOKEN, no TLS).
        `multiplex`: feeds issued concurrently go out together as Stream messages, one per
        routing key per event-loop tick (see `multiplex.py`); off by default for now: a Stream
        that stalls behind a proxy while its replica drains is not yet detected."""
        self.target = target
        self.retry = retry or RetryPolicy()
        self.route_key = route_key  # for every session this client creates (None: one each)
        self.channel = (credentials or Credentials.from_env()).channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.sessions = pb_grpc.SessionServiceStub(self.channel)
        self.mux = FeedMux(self.sessions) if multiplex else None
        self.registry = reg_grpc.ModelRegistryStub(self.channel)

    async def __aenter__(self) -> SeqServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.mux is not None:
            await self.mux.close()
        await self.channel.close()

    async def create_session(
        self,
        model: str,
        version: str = "",
        *,
        seed: int | None = None,
        ttl_seconds: float | None = None,
        sampling: types.Sampling | None = None,
        route_key: str | None = None,
    ) -> ClientSession:
        """A new session; `route_key` (else the client's, else a random one) routes it."""
        request = pb.CreateSessionRequest(model=model, version=version, request_id=new_request_id())
        key = route_key or self.route_key or secrets.token_urlsafe(6)
        metadata = ((ROUTE_HEADER, key),)
        if seed is not None:
            request.seed = seed
        if ttl_seconds is not None:
            request.ttl.CopyFrom(_duration(ttl_seconds))
        if sampling is not None:
            request.default_sampling.CopyFrom(sampling)
        response = await self.retry.run(
            lambda: self.sessions.CreateSession(request, metadata=metadata)
        )
        return ClientSession(self, response.session)

    async def attach(self, session_id: str) -> ClientSession:
        """A handle on an existing session (e.g. after a reconnect)."""
        response = await self.sessions.GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=route_metadata(session_id)
        )
        return ClientSession(self, response.session)

    async def list_models(self) -> list[reg_pb.ModelSummary]:
        return list((await self.registry.ListModels(reg_pb.ListModelsRequest())).models)


class ClientSession:
    def __init__(self, client: SeqServeClient, info: types.Session) -> None:
        self.client = client
        self.info = info
        self.session_id = info.session_id
        self.metadata = route_metadata(info.session_id)  # on every call: routes to its replica
        # What the server has applied, as far as we know; None after a generation we stopped
        # reading early (the server may have applied a token more): asked again before use.
        self.position: int | None = info.position

    async def feed(
        self,
        text: str | None = None,
        tokens: Sequence[int] | None = None,
        frames: Sequence[float] | None = None,
        *,
        top_k: int = 0,
    ) -> TokenPrediction:
        """Feed one chunk; returns the prediction after its last input. Applied exactly once,
        across retries (see the module docstring)."""
        if self.position is None:
            await self.refresh()
        mux = self.client.mux
        if mux is not None:  # with the other feeds of this tick, in one Stream message
            item = pb.StreamItem(
                session_id=self.session_id,
                request_id=new_request_id(),
                input=make_input(text, tokens, frames),
                options=types.PredictionOptions(top_k=top_k),
                expected_position=self.position,
            )
            reply = await self.client.retry.run(lambda: mux.feed(item))
            self.position = reply.position
            return prediction_from_pb(reply.prediction)
        request = pb.StepRequest(
            session_id=self.session_id,
            request_id=new_request_id(),
            input=make_input(text, tokens, frames),
            options=types.PredictionOptions(top_k=top_k),
            expected_position=self.position,
        )
        response = await self.client.retry.run(
            lambda: self.client.sessions.Step(request, metadata=self.metadata)
        )
        self.position = response.position
        return prediction_from_pb(response.prediction)

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
    ) -> AsyncIterator[GeneratedPiece]:
        """Unset arguments fall back to the session's default sampling, then the server's.
        Retried like `feed`: a token is yielded once, however often the server resends it."""
        if self.position is None:
            await self.refresh()
        request = pb.GenerateRequest(
            session_id=self.session_id,
            request_id=new_request_id(),
            sampling=make_sampling(temperature, top_k, top_p, max_tokens, stop, stop_token_ids),
            expected_position=self.position,
        )
        if prompt is not None:
            request.prompt.CopyFrom(make_input(text=prompt))
        policy = self.client.retry
        deadline = time.monotonic() + policy.deadline_seconds
        backoff = policy.first_backoff_seconds
        yielded = 0
        done = False
        try:
            while True:
                call = self.client.sessions.Generate(request, metadata=self.metadata)
                seen = 0
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
                    if not retryable(err) or time.monotonic() > deadline:
                        raise
                finally:
                    call.cancel()
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, policy.max_backoff_seconds)
        finally:
            if not done:  # stopped early: the server may have applied a token more
                self.position = None

    async def fork(self, *, seed: int | None = None) -> ClientSession:
        request = pb.ForkSessionRequest(session_id=self.session_id, request_id=new_request_id())
        if seed is not None:
            request.seed = seed
        response = await self.client.retry.run(
            lambda: self.client.sessions.ForkSession(request, metadata=self.metadata)
        )
        return ClientSession(self.client, response.session)

    async def refresh(self) -> types.Session:
        response = await self.client.sessions.GetSession(
            pb.GetSessionRequest(session_id=self.session_id), metadata=self.metadata
        )
        self.info = response.session
        self.position = response.session.position
        return self.info

    async def close(self) -> None:
        await self.client.sessions.CloseSession(
            pb.CloseSessionRequest(session_id=self.session_id), metadata=self.metadata
        )


def route_metadata(session_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call on `session_id` (for a Stream: one per routing key)."""
    return ((ROUTE_HEADER, route_of(session_id)),)


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


__all__ = ["ClientSession", "RetryPolicy", "SeqServeClient", "new_request_id", "retryable"]

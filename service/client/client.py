"""An asyncio client for seqserve.

    async with SeqServeClient("127.0.0.1:50051", timeout=10) as client:
        async with await client.create_session("bytes-lstm", seed=7) as session:
            first = await session.feed(text="def ")
            async for piece in session.generate(max_tokens=40, temperature=0.8):
                print(piece.text, end="")

Results are plain dataclasses (`results.py`). Every failure is a
`service.client.errors.SeqServeError`, one subclass per reason the server gives (`errors.py`);
no bare `grpc.aio.AioRpcError` leaves a method here.

Timeouts: `timeout=` on the client is every call's default, `timeout=` on a call overrides it;
it bounds the whole call, retries included (`DeadlineExceededError` when it runs out).

Exactly once across crashes: every feed, generation, creation and fork carries a request id,
and feeds and generations the position the session is expected at. When the server is
unreachable (UNAVAILABLE: restarting, draining, its disk refusing writes) the client retries
the same request with the same id and position, within its `RetryPolicy`; the server applies
it if it had not, or answers with the original reply if it had (a generation resends the
tokens it applied and goes on; the client yields each token once). So an app that calls
`session.feed(...)` across a server crash and restart sees each input applied exactly once.
Reads are retried too; `close` is not (a second close would be refused).

Routing: every call carries the session's routing key as `x-seqserve-route` metadata, so a
load balancer that hashes it (nginx, ingress-nginx; see the README) sends all calls of a
session to one replica. A new session's key is the one given to `create_session`, else the
client's `route_key`; it is part of the session id from then on. The client's `route_key`
defaults to one random key per client when it multiplexes (its sessions share one Stream and
one replica), else none (a random key per session, spread over the replicas).

Multiplexing (on by default, `multiplex=False` turns it off): feeds issued concurrently on one
client go out as Stream messages, one per routing key per event-loop tick (`multiplex.py`).
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration

from service.client.credentials import Credentials
from service.client.errors import SeqServeError
from service.client.message_limits import MAX_ITEMS_PER_MESSAGE
from service.client.multiplex import STALL_SECONDS, FeedMux
from service.client.outcome import checked_locally, refused_locally
from service.client.results import (
    GeneratedPiece,
    ModelInfo,
    Prediction,
    SessionInfo,
    TokenPrediction,
    make_input,
    make_sampling,
    model_from_pb,
    require_str,
    set_field,
)
from service.client.retry import (
    CHANNEL_OPTIONS,
    Pauses,
    RetryPolicy,
    check_timeout,
    new_request_id,
    retryable,
)
from service.client.session import ClientSession, route_metadata
from service.client.target_address import check_target
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.sessions.session import ROUTE_HEADER, valid_route

T = TypeVar("T")


class SeqServeClient:
    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        retry: RetryPolicy | None = None,
        route_key: str | None = None,
        credentials: Credentials | None = None,
        multiplex: bool = True,
        stall_seconds: float = STALL_SECONDS,
        max_items_per_message: int = MAX_ITEMS_PER_MESSAGE,
        channel_options: Sequence[tuple[str, int]] = (),
    ) -> None:
        """`timeout`: seconds for each call (None: no limit), unless the call gives its own.
        `retry`: how long to retry what is safe to retry. `credentials`: a token and TLS
        (default: the token in SEQSERVE_TOKEN, no TLS). `multiplex`: feeds issued concurrently
        go out together as Stream messages, one per routing key per event-loop tick (see
        `multiplex.py`); `stall_seconds`: a Stream with feeds pending and no reply for this
        long is broken and its feeds retried on a fresh one; `max_items_per_message` and
        `max_message_bytes` bound a Stream message (lowered to a server's own when it refuses
        one). `channel_options`: more gRPC channel options (e.g. `("grpc.enable_http_proxy",
        0)`). `route_key`: the routing key of
        the sessions this client creates (default: one random key per multiplexing client,
        else a random key per session)."""
        with checked_locally():
            self.target = require_str("target", target)
            check_target(self.target)  # gRPC would take port 99999 as 34463
            self.timeout = check_timeout(timeout)
        self.retry = retry or RetryPolicy()
        self.pauses = Pauses()  # the backoff pauses of this client's calls (`close` ends them)
        # For every session this client creates (None: one each). A multiplexing client keeps
        # its sessions on one key, so that their feeds share one Stream (and one replica).
        self.route_key = route_key or (secrets.token_urlsafe(6) if multiplex else None)
        self.channel_options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *CHANNEL_OPTIONS,
            *channel_options,
        ]
        self.channel = (credentials or Credentials.from_env()).channel(
            target, options=self.channel_options
        )
        # The generated stubs, for what the methods here do not cover (they raise bare
        # grpc.aio.AioRpcError and do not retry).
        self.sessions = pb_grpc.SessionServiceStub(self.channel)
        self.mux = (
            FeedMux(
                self.sessions,
                stall_seconds=stall_seconds,
                max_message_bytes=max_message_bytes,
                max_items_per_message=max_items_per_message,
            )
            if multiplex
            else None
        )
        self.registry = reg_grpc.ModelRegistryStub(self.channel)

    async def __aenter__(self) -> SeqServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. The client's calls still running end with
        `asyncio.CancelledError`: those in flight (the channel cancels them, the multiplexer
        its feeds) and those waiting to retry alike."""
        self.pauses.close()
        if self.mux is not None:
            await self.mux.close()
        await self.channel.close()

    def _timeout(self, timeout: float | None) -> float | None:
        """A call's timeout: its own (checked), else the client's."""
        if timeout is None:
            return self.timeout
        try:
            return check_timeout(timeout)
        except (TypeError, ValueError) as exc:
            raise refused_locally(exc) from None

    def _retried(
        self,
        attempt: Callable[[float | None], Awaitable[T]],
        *,
        timeout: float | None,
        retry: bool = True,
        busy: bool = False,
    ) -> Awaitable[T]:
        """`attempt` under the client's retry policy, within `timeout` (None: the client's),
        its backoff pauses ended by `close` (see `RetryPolicy.run`). (A plain function: no
        coroutine of its own on a feed's path.)"""
        return self.retry.run(
            attempt, timeout=self._timeout(timeout), retry=retry, busy=busy, pauses=self.pauses
        )

    async def create_session(
        self,
        model: str,
        version: str = "",
        *,
        seed: int | None = None,
        ttl_seconds: float | None = None,
        sampling: types.Sampling | None = None,
        route_key: str | None = None,
        timeout: float | None = None,
    ) -> ClientSession:
        """A new session on `model` at `version` ("" : alias `production`, else the latest; a
        number; an alias). `route_key` (else the client's, else a random one) routes it.
        Usable as `async with await client.create_session(...) as session:` (closed on exit)."""
        with checked_locally():
            request = pb.CreateSessionRequest(
                model=require_str("model", model),
                version=require_str("version", version),
                request_id=new_request_id(),
            )
            key = require_str("route_key", route_key or self.route_key or secrets.token_urlsafe(6))
            if not valid_route(key):  # as the server refuses it (one it could not even send)
                raise ValueError(f"route_key must be 1-64 characters of A-Z a-z 0-9 _ -: {key!r}")
            set_field(request, "seed", seed, "an int")
            if ttl_seconds is not None:
                request.ttl.CopyFrom(_duration(ttl_seconds))
            if sampling is not None:
                if not isinstance(sampling, types.Sampling):
                    raise TypeError(
                        f"sampling must be a seqserve.v1.Sampling (make_sampling builds one), "
                        f"not {type(sampling).__name__}"
                    )
                request.default_sampling.CopyFrom(sampling)
        metadata = ((ROUTE_HEADER, key),)
        response = await self._retried(
            lambda left: self.sessions.CreateSession(request, metadata=metadata, timeout=left),
            timeout=timeout,
        )
        return ClientSession(self, response.session)

    async def attach(self, session_id: str, *, timeout: float | None = None) -> ClientSession:
        """A handle on an existing session (e.g. after a reconnect)."""
        with checked_locally():
            request = pb.GetSessionRequest(session_id=require_str("session_id", session_id))
        metadata = route_metadata(session_id)
        response = await self._retried(
            lambda left: self.sessions.GetSession(request, metadata=metadata, timeout=left),
            timeout=timeout,
        )
        return ClientSession(self, response.session)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = await self._retried(
            lambda left: self.registry.ListModels(reg_pb.ListModelsRequest(), timeout=left),
            timeout=timeout,
        )
        return [model_from_pb(m) for m in response.models]

    async def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """A model with its versions' details (status, cell, fingerprint, manifest, ...)."""
        with checked_locally():
            request = reg_pb.GetModelRequest(name=require_str("name", name))
        response = await self._retried(
            lambda left: self.registry.GetModel(request, timeout=left),
            timeout=timeout,
        )
        return model_from_pb(response.model)

    async def set_alias(
        self, name: str, alias: str, version: int, *, timeout: float | None = None
    ) -> dict[str, int]:
        """Point `alias` at `version` (needs the admin role when auth is on); the model's
        aliases after it. Retried like a read: setting it again changes nothing."""
        with checked_locally():
            request = reg_pb.SetAliasRequest(
                name=require_str("name", name), alias=require_str("alias", alias)
            )
            set_field(request, "version", version, "an int")
        response = await self._retried(
            lambda left: self.registry.SetAlias(request, timeout=left),
            timeout=timeout,
        )
        return dict(response.aliases)

    async def delete_alias(
        self, name: str, alias: str, *, timeout: float | None = None
    ) -> dict[str, int]:
        """Remove `alias` (admin role); the aliases left. Not retried: a second delete would
        be refused."""
        with checked_locally():
            request = reg_pb.DeleteAliasRequest(
                name=require_str("name", name), alias=require_str("alias", alias)
            )
        response = await self._retried(
            lambda left: self.registry.DeleteAlias(request, timeout=left),
            timeout=timeout,
            retry=False,
        )
        return dict(response.aliases)


def _duration(seconds: float) -> Duration:
    """`ttl_seconds` as a Duration (TypeError or ValueError naming it, for `checked_locally`)."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"ttl_seconds must be a number, not {type(seconds).__name__}")
    if not math.isfinite(seconds):
        raise ValueError(f"ttl_seconds must be finite, not {seconds}")
    nanoseconds = int(seconds * 1e9)
    if nanoseconds == 0:  # the server refuses a ttl of 0 (unset would be its default)
        raise ValueError(f"ttl_seconds must be more than 0 (None: the server's default): {seconds}")
    d = Duration()
    d.FromNanoseconds(nanoseconds)
    return d


__all__ = [
    "ClientSession",
    "GeneratedPiece",
    "ModelInfo",
    "Prediction",
    "RetryPolicy",
    "SeqServeClient",
    "SeqServeError",
    "SessionInfo",
    "TokenPrediction",
    "make_input",
    "make_sampling",
    "new_request_id",
    "retryable",
    "route_metadata",
]

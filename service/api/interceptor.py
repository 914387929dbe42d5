"""The one place errors become gRPC statuses, and every RPC is timed.

A `SeqServeError` ends the call with its declared status and message (`error_status`, which
leaves no reference cycle behind). `NotImplementedError` (a method the servicer does not
implement, as generated base classes raise) is UNIMPLEMENTED. Anything else is a bug: it is
logged with an error id, and the client gets INTERNAL with that id and no stack trace.

Until the server is ready (`ready` returns true), calls to the gated services (seqserve.v1.*)
are refused with UNAVAILABLE; health and reflection always pass.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.api.error_status import (
    abort_with,
    answered_status,
    code_name,
    returned_code_name,
    server_stopped,
)
from service.errors import InvalidArgument, NotReady, SeqServeError, Unauthenticated
from service.security import principal
from service.security.call_auth import REVOKED_MESSAGE, CallAuth, Grant, current_grant
from service.security.revocation_watch import RevocationWatch

log = logging.getLogger(__name__)

RpcObserver = Callable[[str, str, float, str, str], None]  # (method, code, s, protocol, reason)

# Method paths refused with UNAVAILABLE until the server is ready.
GATED_PREFIXES: tuple[str, ...] = ("/seqserve.v1.",)
NOT_READY_MESSAGE = "server is starting; retry shortly"
MAX_WRAPPED_METHODS = 1024


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        observe_rpc: RpcObserver,
        max_message_bytes: int = 0,
        ready: Callable[[], bool] | None = None,
        auth: CallAuth | None = None,
    ) -> None:
        self._observe = observe_rpc
        self._max_message_bytes = max_message_bytes  # 0 = no check here
        self._ready = ready  # None: always ready
        self._auth = auth  # None: no authentication
        # path -> (the servicer's handler, ours around it): built once a method, not once a
        # call (closures, a handler tuple and an `inspect` check each time, per Generate call).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        path = details.method
        known = self._wrapped.get(path)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(path, handler)
        if len(self._wrapped) < MAX_WRAPPED_METHODS:  # only registered methods get here
            self._wrapped[path] = (handler, wrapped)
        return wrapped

    def _wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        gated = self._ready is not None and path.startswith(GATED_PREFIXES)
        kwargs = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(path, self._sized(handler.unary_unary), gated), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(
                    path, handler.unary_stream, self._sized(handler.unary_stream), gated
                ),
                **kwargs,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(path, _checked_stream(handler.stream_unary), gated), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(
                path, handler.stream_stream, _checked_stream(handler.stream_stream), gated
            ),
            **kwargs,
        )

    def _sized(self, fn: Any) -> Any:
        """Refuse a request message over the configured size with INVALID_ARGUMENT. (The
        transport's own ceiling, twice the setting, answers RESOURCE_EXHAUSTED beyond that.)"""
        limit = self._max_message_bytes
        if limit <= 0:
            return fn

        def sized(request: Any, context: grpc.aio.ServicerContext) -> Any:
            check_message_size(request, limit)
            return fn(request, context)

        return sized

    def _watch(self, grant: Grant, context: grpc.aio.ServicerContext) -> RevocationWatch:
        """`grant`'s call, ended by the revocation watch with UNAUTHENTICATED if its token
        is revoked while it waits (the handler's read or wait then ends with gRPC's abort)."""
        watch = self._auth.revocations if self._auth is not None else None
        assert watch is not None, "a grant comes only from a tokens file"

        async def end() -> bool:
            return await abort_with(context, answered_status(Unauthenticated(REVOKED_MESSAGE)))

        watch.watch(grant, end)
        return watch

    def _check_ready(self, gated: bool) -> None:
        if gated and self._ready is not None and not self._ready():
            raise NotReady(NOT_READY_MESSAGE)

    def _unary(self, path: str, fn: Any, gated: bool = False) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Observed(self, path, gated, context) as observed:
                observed.admit()
                check_parsed(request)
                result = fn(request, context)
                return await result if inspect.isawaitable(result) else result
            return None  # refused: its status is sent

        return call

    def _streaming(self, path: str, original: Any, fn: Any, gated: bool = False) -> Any:
        """Wrap a response-streaming handler. `original` is the servicer's own function,
        inspected to choose the wrapper; `fn` is what to call (it may wrap `original`).

        An async generator yields its responses, and so does its wrapper. Anything else (a
        coroutine that sends with `context.write`, like the aio health servicer's Watch, or a
        plain function such as an unimplemented method) gets a coroutine wrapper: gRPC aio
        does not allow a handler both to write and to yield."""
        if inspect.isasyncgenfunction(original):

            async def iterate(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with _Observed(self, path, gated, context) as observed:
                    grant = observed.admit(lasting=True)
                    check_parsed(request)
                    if grant is None:
                        async for response in fn(request, context):
                            yield response
                        return
                    # A token revoked while the call is open ends it before its next reply,
                    # or, while it waits for its client or its turn, within about 2 s.
                    watch = self._watch(grant, context)
                    try:
                        async with contextlib.aclosing(fn(request, context)) as responses:
                            async for response in responses:
                                grant.check()
                                yield response
                    finally:
                        watch.unwatch(grant)

            return iterate

        async def run(request: Any, context: grpc.aio.ServicerContext) -> None:
            async with _Observed(self, path, gated, context) as observed:
                observed.admit()
                result = fn(request, context)
                if inspect.isawaitable(result):
                    await result
                elif hasattr(result, "__aiter__"):  # an async iterator from a plain function
                    async for response in result:
                        await context.write(response)
                elif result is not None:  # a plain iterator (e.g. a sync generator)
                    for response in result:
                        await context.write(response)

        return run


class _Observed:
    """Around one call: who calls (the call's principal, for ownership checks below), the
    readiness gate (`admit`, the first thing a call does), the status its error maps to, its
    timing. (A class: a generator-based context manager cost a generator and two more awaits
    a call.)"""

    __slots__ = ("_context", "_gated", "_owner", "_path", "_started")

    def __init__(
        self,
        owner: ErrorMappingInterceptor,
        path: str,
        gated: bool,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._owner, self._path, self._gated, self._context = owner, path, gated, context
        self._started = time.perf_counter()

    def admit(self, lasting: bool = False) -> Grant | None:
        """Authenticate the call and check readiness (raises what refuses it). A `lasting`
        call (one that streams its responses) gets its grant, to check again as it goes
        (also as `call_auth.current_grant`, for what it runs: StreamMux)."""
        owner = self._owner
        grant = None
        if owner._auth is not None:
            who = owner._auth.principal(self._path, self._context)
            principal.current.set(who)
            if lasting:
                grant = owner._auth.grant(self._path, self._context, who)
                current_grant.set(grant)
        owner._check_ready(self._gated)
        return grant

    async def __aenter__(self) -> _Observed:
        return self

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        """Count the call (before its status goes out, as a response is: a client that has
        its answer finds the call in the metrics); end a failed one with its status
        (`abort_with`) and return True (the handler returns). A cancellation, or an abort the
        handler made itself, goes on.

        `exc` loses its traceback once answered (`answered_status`)."""
        seconds = time.perf_counter() - self._started
        method = _method(self._path)
        if exc is None:
            self._owner._observe(method, returned_code_name(self._context), seconds, "grpc", "")
            return False
        reason = exc.reason if isinstance(exc, SeqServeError) else ""  # a refusal's kind
        self._owner._observe(method, code_name(exc, self._context), seconds, "grpc", reason)
        if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
            return False
        if server_stopped(exc):  # nothing can be sent: the call just ends (no traceback)
            return True
        await abort_with(self._context, answered_status(exc))
        return True


def _method(path: str) -> str:
    """A method path's last part: "/seqserve.v1.SessionService/Step" → "Step"."""
    return path[path.rfind("/") + 1 :]


class _Unparsable:
    """A request body that is not the method's protobuf message (kept to be refused in the
    handler, where the refusal is a status like any other and is counted)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def ByteSize(self) -> int:
        return self.size


def _lenient(deserializer: Any) -> Any:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Unparsable(len(data))

    return parse


def check_parsed(request: Any) -> None:
    """INVALID_ARGUMENT for a request body that did not parse as the method's message."""
    if isinstance(request, _Unparsable):
        log.warning("refused a request body of %d bytes that is not valid protobuf", request.size)
        raise InvalidArgument("the request is not a valid protobuf message for this method")


def checks_its_requests(fn: Any) -> Any:
    """Mark a request-streaming handler that calls `check_parsed` on each request itself, so
    its requests do not pass through one more async generator each (the Stream hot path)."""
    fn.checks_its_requests = True
    return fn


def _checked_stream(fn: Any) -> Any:
    """A request-streaming handler whose requests are checked as they arrive."""
    if getattr(fn, "checks_its_requests", False):
        return fn

    def handler(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                check_parsed(request)
                yield request

        return fn(checked(), context)

    return handler


def check_message_size(message: Any, limit: int) -> None:
    """INVALID_ARGUMENT for a request message over `limit` bytes (0: no limit)."""
    if limit <= 0:
        return
    size = message.ByteSize()
    if size > limit:
        err = InvalidArgument(
            f"message of {size} bytes exceeds the limit of {limit} "
            "(SEQSERVE_SERVER__MAX_MESSAGE_BYTES); send smaller chunks or fewer items"
        )
        err.metadata["max_message_bytes"] = str(limit)  # what a client lowers its own to
        raise err

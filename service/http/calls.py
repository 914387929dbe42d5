"""One HTTP request as one call of a seqserve.v1 method: who calls (the same `CallAuth` as gRPC,
from the `Authorization` header or the TLS client certificate), the readiness gate, the
protobuf request parsed from JSON with protobuf's JSON mapping, and the call's timing in the
same metric family as gRPC's (`protocol="http"`).

The servicers are the gRPC ones: they read a call's metadata through `invocation_metadata()`
and its certificate through `auth_context()`, which `HttpContext` gives them from HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from service.api.error_status import code_name
from service.api.interceptor import NOT_READY_MESSAGE
from service.errors import InvalidArgument, NotReady, SeqServeError, Unavailable, quote
from service.http.request_body import (
    DECODED,
    check_declared_length,
    content_coding,
    decode,
    too_large,
)
from service.http.status_map import HttpError, HttpRefusal
from service.security import principal
from service.security.call_auth import CLIENT_HEADER, CallAuth, current_grant
from service.security.revocation_watch import RevocationWatch
from service.sessions.session import ROUTE_HEADER

M = TypeVar("M", bound=Message)
Descriptor = Any  # a message's descriptor (protobuf's Python or upb class)

# Headers a servicer or CallAuth reads as gRPC metadata (lower-case, as gRPC gives them).
FORWARDED_HEADERS = ("authorization", ROUTE_HEADER, CLIENT_HEADER)

RpcObserver = Callable[[str, str, float, str, str], None]  # (method, code, s, protocol, reason)


@dataclass(frozen=True)
class _Metadatum:
    key: str
    value: str


class HttpContext:
    """What the servicers and `CallAuth` read of a gRPC call, from an HTTP request."""

    def __init__(self, request: web.Request) -> None:
        self._request = request

    def invocation_metadata(self) -> tuple[_Metadatum, ...]:
        headers = self._request.headers
        return tuple(  # every value: call_auth refuses a header sent twice, as over gRPC
            _Metadatum(name, value)
            for name in FORWARDED_HEADERS
            for value in headers.getall(name, ())
        )

    def auth_context(self) -> dict[str, list[bytes]]:
        """The verified client certificate's common name, as gRPC's auth context names it."""
        transport = self._request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        if not cert:
            return {}
        names = [v.encode() for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        return {"x509_common_name": names} if names else {}


class Calls:
    """Runs seqserve.v1 methods for HTTP requests; errors become HTTP answers here only."""

    def __init__(
        self,
        auth: CallAuth,
        ready: Callable[[], bool],
        observe: RpcObserver,
        max_body_bytes: int,
        body_timeout_seconds: float = 30.0,
    ) -> None:
        self._auth = auth
        self._ready = ready
        self._observe = observe
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds
        self.draining = False
        self._in_flight = 0  # calls between entering `call` and leaving it
        self._settled = asyncio.Event()  # set while none is

    @property
    def revocations(self) -> RevocationWatch | None:
        """The watch that ends the open calls of revoked tokens (None without a tokens file)."""
        return self._auth.revocations

    async def settled(self) -> None:
        """Returns once no call is in flight (a draining server refuses new ones at once)."""
        while self._in_flight:
            self._settled.clear()
            await self._settled.wait()

    @contextlib.asynccontextmanager
    async def call(
        self, grpc_path: str, request: web.Request, *, lasting: bool = False
    ) -> AsyncIterator[None]:
        """Around one call of the method at `grpc_path`: the caller's principal (and, for a
        `lasting` call, its `call_auth.current_grant`, to check again as it goes), the readiness
        gate, the timing (labelled as the interceptor labels gRPC's). Errors propagate;
        `error_answer` turns them into HTTP."""
        started = time.perf_counter()
        code, reason = "OK", ""
        self._in_flight += 1
        try:
            context = HttpContext(request)
            who = self._admit(grpc_path, context)
            principal.current.set(who)
            if lasting:
                # Taken with the principal, before the body is read: a token revoked from here
                # on is seen by a generation's `grant.check()` (one taken later would start
                # from the tokens file as already changed, and never look again).
                current_grant.set(self._auth.grant(grpc_path, context, who))
            yield
        except ConnectionResetError:  # the client went away while we wrote
            code = "CANCELLED"
            raise
        except BaseException as exc:
            code = code_name(exc)
            reason = exc.reason if isinstance(exc, SeqServeError) else ""
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._settled.set()
            method = grpc_path.rsplit("/", 1)[-1]
            self._observe(method, code, time.perf_counter() - started, "http", reason)

    def _admit(self, grpc_path: str, context: HttpContext) -> principal.Principal | None:
        """The caller's principal, if the call is taken at all: its credentials (401, 403),
        a drain (503), readiness (503)."""
        who = self._auth.principal(grpc_path, context)
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")
        if not self._ready():
            raise NotReady(NOT_READY_MESSAGE)
        return who

    def refusal_before_body(self, grpc_path: str, request: web.Request) -> SeqServeError | None:
        """What the call would be refused with before its body is read (`_admit`'s checks,
        then a Content-Length over the limit), counted as the call's refusal; None if it
        would read the body. For `Expect: 100-continue`: the client is answered without
        being asked for a body it would send for nothing."""
        try:
            self._admit(grpc_path, HttpContext(request))
            check_declared_length(request.content_length, self.max_body_bytes)
        except SeqServeError as exc:
            self._observe(grpc_path.rsplit("/", 1)[-1], code_name(exc), 0.0, "http", exc.reason)
            return exc
        return None

    async def parse(self, request: web.Request, message: M, **path_fields: str) -> M:
        """The request body (JSON; empty is `{}`) as `message`, with `path_fields` (the ids in
        the URL) set; a body that names another value for one of them is refused."""
        coding = content_coding(request)
        check_declared_length(request.content_length, self.max_body_bytes)
        try:  # the whole body, however many pieces it arrives in (the app caps its size)
            async with asyncio.timeout(self.body_timeout_seconds):
                raw = await request.read()
        except TimeoutError:  # a client that sent part of it and then nothing, or trickles
            raise BodyTimeout(
                f"the request body did not arrive within {self.body_timeout_seconds:g} s "
                "(SEQSERVE_SERVER__HTTP_BODY_TIMEOUT_SECONDS); the connection is closed"
            ) from None
        except web.HTTPRequestEntityTooLarge:  # chunked or compressed: cut off at the cap
            raise too_large(None, self.max_body_bytes) from None
        except web.RequestPayloadError as exc:  # a chunked body with a malformed chunk, say
            why = type(exc.__cause__ or exc).__name__
            raise InvalidArgument(f"the request body could not be read: {why}") from None
        if coding in DECODED:  # aiohttp's decoding is off (`HttpApi`): this checks the end
            raw = decode(raw, coding, self.max_body_bytes)
        if len(raw) > self.max_body_bytes:
            raise too_large(len(raw), self.max_body_bytes)
        if raw.strip():
            try:
                json_format.ParseDict(_json_object(raw, message.DESCRIPTOR), message)
            except (json_format.ParseError, ValueError, TypeError) as exc:
                raise InvalidArgument(f"the request body is not a valid JSON {_name(message)}: "
                                      f"{quote(str(exc), 160)}") from None  # fmt: skip
        for field, value in path_fields.items():
            given = getattr(message, field)
            if given and given != value:
                raise InvalidArgument(
                    f"{field} in the body ({quote(given)}) is not the one in the path "
                    f"({quote(value)})"
                )
            setattr(message, field, value)
        return message


def to_json(message: Message) -> dict[str, Any]:
    """A protobuf message as protobuf's JSON mapping gives it, every field shown."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def json_answer(message: Message) -> web.Response:
    return web.json_response(to_json(message))


def error_answer(exc: BaseException) -> web.Response:
    error = HttpError(exc)
    answer = web.json_response(error.body, status=error.http_status, headers=error.headers)
    if error.closes:  # `Connection: close`: the rest of the request is not read
        answer.force_close()
    return answer


class BodyTimeout(HttpRefusal, InvalidArgument):
    """The request's body did not arrive within `server.http_body_timeout_seconds`: HTTP's
    408 Request Timeout. INVALID_ARGUMENT, not DEADLINE_EXCEEDED (whose HTTP status is 504, a
    gateway's): the client's fault, counted as a client error (a slow client pages no one:
    the error-ratio alert counts DEADLINE_EXCEEDED as the server's), with a reason of the
    error table (which has no row for DEADLINE_EXCEEDED, a status only gRPC makes)."""

    http_status = 408


def _json_object(raw: bytes, descriptor: Descriptor) -> dict[str, Any]:
    """The body as a JSON object of the message `descriptor` describes. Parsed here rather
    than by `json_format.Parse`, which takes any JSON value: `[]` would be read as `{}` (a call
    with every field unset) and a string char by char. Duplicate keys are refused, as
    `json_format.Parse` refuses them, and so is a field given under both its names."""
    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        if not isinstance(document, dict):
            raise ValueError(f"a JSON {_JSON_TYPES.get(type(document), 'value')}, not an object")
        _fields_named_once(document, descriptor)
    except RecursionError:  # nested deeper than the interpreter's stack
        raise ValueError("nested too deeply") from None
    return document


def _fields_named_once(document: dict[str, Any], descriptor: Descriptor, where: str = "") -> None:
    """Refuses a field of `document` (an object of the message `descriptor` describes, and
    the objects of its message fields, down the tree) given under both the names protobuf's
    JSON mapping reads, its JSON name and its proto name (`requestId`, `request_id`): parsed,
    the last would win. A map's keys are data, not field names (its message values are looked
    into); so are the members of google.protobuf's types (a `Struct`'s keys; the others' JSON
    forms have no fields of theirs). Keys that name no field are left to `json_format`."""
    by_json_name = {field.json_name: field for field in descriptor.fields}
    given: dict[str, str] = {}  # field name -> the key it was given under
    for key, value in document.items():
        field = by_json_name.get(key) or descriptor.fields_by_name.get(key)
        if field is None:
            continue
        name = where + field.name
        if field.name in given:
            raise ValueError(f"field {name!r} given twice, as {given[field.name]!r} and {key!r}")
        given[field.name] = key
        kind = field.message_type
        if kind is None or kind.full_name.startswith("google.protobuf."):
            continue
        if kind.GetOptions().map_entry:  # {key: value}: the values may be messages
            kind = kind.fields_by_name["value"].message_type
            if kind is None or kind.full_name.startswith("google.protobuf."):
                continue
            values = list(value.values()) if isinstance(value, dict) else []
        else:
            values = value if isinstance(value, list) else [value]  # repeated, or one
        for item in values:
            if isinstance(item, dict):
                _fields_named_once(item, kind, name + ".")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {quote(key)}")
        document[key] = value
    return document


_JSON_TYPES: dict[type, str] = {
    list: "array", str: "string", int: "number", float: "number", bool: "boolean",
    type(None): "null",
}  # fmt: skip


def _name(message: Message) -> str:
    return message.DESCRIPTOR.name

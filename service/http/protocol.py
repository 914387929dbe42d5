"""aiohttp's connection protocol with the API's own error answers: a request aiohttp cannot parse
(a malformed request line, a bad header, a header line over its 8190-byte limit, a malformed
chunk that arrived with the head) is answered by aiohttp itself, before any route or middleware
sees it, with a text/plain 400 that quotes the bytes it choked on. Here it is the JSON error
body every other answer has (400 INVALID_ARGUMENT, naming the kind of error and nothing the
client sent), and so is the 500 aiohttp would give a handler's unexpected exception (INTERNAL,
with an error id, logged as every INTERNAL is). So is a request that expects anything but
`100-continue` (`expect_continue`: aiohttp's is a text/plain 417 quoting the header).

aiohttp has no setting for these answers: they come from `RequestHandler.handle_error`, so the
runner's server makes connections of a subclass (`JsonErrorRunner` is `web.AppRunner` with
that server; `tests/http_api/test_refused_headers.py` would see aiohttp change this)."""

from __future__ import annotations

import logging
import re
from typing import Any

import aiohttp
from aiohttp import hdrs, web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError
from aiohttp.streams import StreamReader
from aiohttp.web_request import BaseRequest

from service.errors import Internal, InvalidArgument, quote
from service.http.calls import error_answer
from service.http.request_body import check_declared_length

log = logging.getLogger(__name__)

# What aiohttp's connection queues for a request that does not parse (None: another aiohttp).
_ERR_INFO: type | None = getattr(web_protocol, "_ErrInfo", None)

# What aiohttp's parse errors add after their words on what is wrong: the bytes, as Python
# quotes them (`: b'…'`, ` '…'`, maybe a last `.`), at the end of the message's first line
# (`Got more than 8190 bytes when reading: b'…'.`, `Invalid HTTP header: '…'`, `Bad status
# line '…'`; llhttp's are `Invalid header token:` with the bytes on the next lines). Only
# that: a quote within the words is theirs (`Transfer-Encoding can't be present…`,
# `Missing 'Host' header in request.`).
_QUOTED = re.compile(r"""(?::\s*|\s+)b?(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\.?$""")


def parse_error(exc: HttpProcessingError) -> InvalidArgument:
    """The error a request aiohttp could not parse is answered with: its kind and aiohttp's
    first words on it, without the bytes aiohttp quotes after them (the start of an over-long
    `Authorization` line), and quoted. An unparsable URL only by its kind: InvalidURLError's
    message is often the request target itself, unquoted (an absolute URL or a CONNECT
    authority aiohttp could not split, a target with a control character)."""
    if isinstance(exc, InvalidURLError):
        return _refused(type(exc).__name__)
    first = _QUOTED.sub("", exc.message.split("\n", 1)[0]).rstrip(":. ")
    return _refused(f"{type(exc).__name__}: {quote(first)}" if first else type(exc).__name__)


def _refused(what: str) -> InvalidArgument:
    return InvalidArgument(
        f"the request could not be read as HTTP/1.1 ({what}); the connection is closed"
    )


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Every route's `Expect` handler, run before the middlewares (as aiohttp's own): over
    HTTP/1.1, `100-continue` as aiohttp answers it (a `100 Continue` before the body is read),
    but for a POST whose Content-Length is over the size limit the final 400 the size check
    would give once the body were in (none is asked for; the connection is closed), and
    anything else 400 INVALID_ARGUMENT with the API's JSON error body, naming nothing the
    client sent, the connection closed once aiohttp has read past the body it may be sending;
    before HTTP/1.1 the header is ignored, as by aiohttp."""
    if request.version != aiohttp.HttpVersion11:
        return None  # no interim answers before HTTP/1.1 (as aiohttp)
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        limit = request.client_max_size - 1  # server.max_message_bytes (`HttpApi`)
        try:  # the final answer the size check gives, without sending for the body first
            if request.method == hdrs.METH_POST:
                check_declared_length(request.content_length, limit)
        except InvalidArgument as exc:
            answer = error_answer(exc)
            answer.force_close()
            return answer
        transport = request.transport  # aiohttp's documented way (`expect_handler`)
        if transport is not None and not transport.is_closing():  # else the client has gone
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None
    answer = error_answer(
        InvalidArgument("the request's Expect header is not 100-continue, the only one served")
    )
    answer.force_close()
    return answer


class JsonErrorHandler(web.RequestHandler):
    _body: StreamReader | None = None  # the body of the last request parsed on the connection

    def data_received(self, data: bytes) -> None:
        """aiohttp's, and then: a parse error in the body of a request whose head was parsed
        before (a malformed chunk arriving after the head) fails that body. aiohttp 3.14's
        parser queues the error as a next request instead, and the handler reading the body
        waited for as long as the client kept the connection (a SIGTERM's drain too), a
        request pipelined behind never answered. The handler's read now fails at once
        (`Calls.parse`: 400, the connection closed)."""
        queue: Any = getattr(self, "_messages", None)  # aiohttp's (message, body) pairs
        queued = len(queue) if queue is not None else 0
        super().data_received(data)
        if queue is None or _ERR_INFO is None:  # another aiohttp: as it is
            return
        for message, payload in list(queue)[queued:]:
            if not isinstance(message, _ERR_INFO):
                self._body = payload
                continue
            body, error = self._body, getattr(message, "exc", None)
            # Unended, the body is where the parser was: the error is in it.
            if body is not None and not body.is_eof() and body.exception() is None:
                failed = web.RequestPayloadError("malformed body")
                if isinstance(error, BaseException):
                    failed.__cause__ = error  # also for a reader not waiting just now
                    body.set_exception(failed, error)
                else:
                    body.set_exception(failed)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            # aiohttp's logging (one WARNING line: `RefusedRequestFilter`), and its refusal to
            # answer on a response already begun; its text answer is not used.
            super().handle_error(request, status, exc, message)
            refused = parse_error(exc)
            answer = error_answer(refused)
            answer.headers[hdrs.CONNECTION] = "close"  # said also in an HTTP/1.0 answer
        else:  # logged by `error_answer` with its error id, as every INTERNAL is
            if request.writer.output_size > 0:  # as aiohttp: nothing more can be sent
                raise ConnectionError("the response was begun: no error answer can follow")
            answer = error_answer(
                exc
                if exc is not None
                else Internal(f"the request's handler failed (HTTP {status})")
            )
        answer.force_close()
        return answer


class JsonErrorServer(web.Server):
    """aiohttp's server, whose connections are `JsonErrorHandler`s; aiohttp's own where its
    internals are not what this was written against (a later aiohttp): its text answers then,
    but every connection is served."""

    def __call__(self) -> web.RequestHandler:
        try:
            return JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        except (AttributeError, TypeError):
            _fallen_back()
            return super().__call__()


class JsonErrorRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `JsonErrorServer` (aiohttp's own where its internals
    differ: see `JsonErrorServer`)."""

    async def _make_server(self) -> web.Server:
        made: Any = await super()._make_server()
        try:
            return JsonErrorServer(
                made.request_handler, request_factory=made.request_factory,
                handler_cancellation=made.handler_cancellation, loop=made._loop, **made._kwargs,
            )  # fmt: skip
        except (AttributeError, TypeError):
            _fallen_back()
            return made  # type: ignore[no-any-return]


_warned = False


def _fallen_back() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "aiohttp %s is not what service/http/protocol.py was written against: requests "
            "it cannot parse get its text/plain answers, not the API's JSON errors",
            aiohttp.__version__,
        )

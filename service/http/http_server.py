"""The HTTP side of a server: an aiohttp application on the gRPC server's event loop, with the
JSON routes, the OpenAPI document and the playground page (plain files shipped in the package)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from importlib import resources
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from service.errors import PortInUse
from service.http.calls import Calls
from service.http.guard import guard
from service.http.openapi import openapi_document
from service.http.protocol import JsonErrorRunner, expect_continue
from service.http.routes import Routes
from service.security.tls import loopback

log = logging.getLogger(__name__)

STATIC_DIR = Path(str(resources.files("service.http") / "static"))


class RefusedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a header line over its 8190-byte limit, a
    malformed line) at ERROR with a traceback, and the exception's message quotes the line:
    an over-long `Authorization` header put the start of its token in the log. Such a record
    becomes one WARNING line that names the error's kind and the peer, nothing the peer sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):  # a body that does not decode: the
            exc = exc.__cause__  # call was answered 400; aiohttp then fails to drain the rest
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused an HTTP request from %s that does not parse: %s (HTTP %d)"
            record.args = (_peer(record), type(exc).__name__, exc.code)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _peer(record: logging.LogRecord) -> str:
    """The remote address aiohttp's record names ("?" if it names none)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return str(args[0]) if args else "?"


def _filter_refused_requests() -> None:
    """Install `RefusedRequestFilter` on aiohttp's server logger (once a process)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RefusedRequestFilter) for f in logger.filters):
        logger.addFilter(RefusedRequestFilter())


class HttpApi:
    def __init__(self, routes: Routes, grace_seconds: float = 10.0) -> None:
        self.calls: Calls = routes.calls
        self._routes = routes
        self._grace_seconds = grace_seconds
        self._loopback = True  # set by start(): the bind address is a loopback one
        self.app = web.Application(
            client_max_size=routes.calls.max_body_bytes + 1,  # `expect_continue` reads it
            middlewares=[guard(lambda: self._loopback)],
        )
        routes.add_to(self.app)
        self.app.on_response_prepare.append(_close_after_unread_body)
        document = openapi_document()

        async def openapi(_: web.Request) -> web.Response:
            return web.json_response(document)

        self.app.router.add_get("/v1/openapi.json", openapi, expect_handler=expect_continue)
        self.app.router.add_get("/", _index, expect_handler=expect_continue)
        # The page's two files by name, not a directory: any other path under /static/ is the
        # guard's JSON 404, as for every path that is no route.
        self.app.router.add_get("/static/{name}", _asset, expect_handler=expect_continue)
        self._runner: JsonErrorRunner | None = None
        self.port = 0

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None, shared: bool = False
    ) -> int:
        """Listen on `host:port` (0 picks a port); returns the bound port. `shared`: with
        SO_REUSEPORT, for the worker processes of `serve --workers` (as gRPC's port)."""
        self._loopback = loopback(host)
        _filter_refused_requests()
        # handler_cancellation: a client that hangs up cancels its call, as in gRPC (and ends a
        # server-sent generation at once).
        self._runner = JsonErrorRunner(  # aiohttp's own error answers in JSON too
            self.app,
            handler_cancellation=True,
            access_log=None,
            auto_decompress=False,  # `Calls.parse` decodes a body: aiohttp checks no gzip end
            # `stop` waits out the grace period itself first: the runner then only gives
            # what is still running a moment (an ended generation writes its last event).
            shutdown_timeout=min(self._grace_seconds, 1.0),
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host, port, ssl_context=ssl_context, reuse_address=True,
            reuse_port=shared or None,
        )  # fmt: skip
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise PortInUse(
                f"cannot listen for HTTP on {host}:{port}: {exc.strerror} (set --http-port, "
                "or -1 to turn the HTTP API off)"
            ) from None
        self.port = int(self._runner.addresses[0][1])  # the bound port (port 0 picks one)
        return self.port

    def begin_draining(self) -> None:
        """New calls get UNAVAILABLE (503) from now; calls in flight go on."""
        self.calls.draining = True

    async def stop(self) -> None:
        """Refuse new calls (503) while the calls in flight finish, for up to the grace period,
        then close the listener and the connections. Until then a client on a kept-alive
        connection or a new one gets the JSON 503 (DRAINING), not a refused connection. A
        generation still streaming when the grace period ends gets its `error` event
        (DRAINING) and a finished body first, while its connection is open: the runner would
        only cancel it (after the grace period again) and cut the body off."""
        if self._runner is None:
            return
        self.begin_draining()
        try:
            await asyncio.wait_for(self.calls.settled(), self._grace_seconds)
        except TimeoutError:
            self._routes.end_streams()
        await self._runner.cleanup()
        self._runner = None


async def _close_after_unread_body(request: web.Request, response: web.StreamResponse) -> None:
    """A request whose body failed to read (it does not decode as its Content-Encoding) is
    answered with `Connection: close`: what follows the bad bytes on the connection is not a
    request. (The hook runs after aiohttp wrote its headers' values, hence the header.)"""
    if isinstance(request.content.exception(), web.RequestPayloadError):
        response.force_close()
        response.headers["Connection"] = "close"


async def _index(_: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


_ASSETS = frozenset({"playground.js", "playground.css"})


async def _asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in _ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})

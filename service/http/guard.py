"""What every HTTP request passes before its route: browsers' cross-site requests and DNS
rebinding are refused, and requests no route takes get JSON errors like every other answer.

- A request that carries `Origin` (browsers send it on cross-origin requests, and on
  same-origin POSTs) must come from the page's own origin, scheme, host and port: a page
  elsewhere cannot make a visitor's browser create sessions or generate here (no CORS is
  offered either), nor can a page on `http://` of this server's name and port when it speaks
  HTTPS (one a network attacker could serve, and whose calls a browser would send with the
  visitor's client certificate). The scheme is this port's (`https` with TLS), or the
  `X-Forwarded-Proto` a proxy in front sets (one ending TLS for it); a page cannot set that
  header on a cross-origin call without a CORS preflight, which is refused.
- Bound to a loopback address, the server answers only requests whose `Host` is a loopback
  name: a DNS-rebinding page (evil.example resolving to 127.0.0.1) is refused. Bound to another
  address it takes any Host (TLS and tokens, or --insecure, guard it there).
- A path that is no route is 404 NOT_FOUND (reason ROUTE_NOT_FOUND); a known path with another
  method is 405 with `Allow`, the body saying UNIMPLEMENTED (as gRPC-JSON transcoders do)."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import SplitResult, urlsplit

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from service.errors import PermissionDenied, RouteNotFound, SeqServeError, quote
from service.http.calls import error_answer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unimplemented(SeqServeError):
    """A known path asked with another method (gRPC's own UNIMPLEMENTED is no row of the error
    table: the interceptor answers it for methods the server lacks)."""

    status = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


def loopback_name(host: str) -> bool:
    """Whether a Host header's name (no port) is a loopback one."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cross_site(request: web.Request, loopback_only: bool) -> str | None:
    """Why `request` is refused (None: it is not). A Host or Origin that does not parse (`[`)
    cannot be shown to be this server's, so it is refused like a foreign one."""
    host = request.host  # the Host header, with its port
    if loopback_only and not loopback_name(_parsed(f"//{host}").hostname or ""):
        return f"Host {quote(host)} is not this server's loopback address (DNS rebinding?)"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    # The scheme the page used: this port's, or the one the (first) proxy in front was asked.
    forwarded = request.headers.get("X-Forwarded-Proto", request.scheme)
    own = _origin(forwarded.split(",")[0].strip().lower(), _parsed(f"//{host}"))
    page = _parsed(origin.strip())
    if own is None or _origin(page.scheme, page) != own:
        return f"cross-origin request from {quote(origin)} refused: use the page at / here"
    return None


Origin = tuple[str, str, int]  # scheme, host name, port


def _origin(scheme: str, url: SplitResult) -> Origin | None:
    """(scheme, host name, port) of `url` with `scheme`, the port its scheme's default if not
    given (`http://localhost` is `http://localhost:80`); None if it names no host or no port
    that parses, or a scheme other than http and https."""
    if scheme not in _DEFAULT_PORTS or not url.hostname:
        return None
    try:
        port = url.port
    except ValueError:  # `:x`, `:99999`
        return None
    return scheme, url.hostname, port if port is not None else _DEFAULT_PORTS[scheme]


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _parsed(url: str) -> SplitResult:
    """`url` split, or an empty one where it does not parse (urlsplit raises ValueError on an
    unclosed `[`)."""
    try:
        return urlsplit(url)
    except ValueError:
        return urlsplit("")


def guard(loopback_only: Callable[[], bool]) -> Middleware:
    """The middleware; `loopback_only()` says whether the server is bound to loopback."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = cross_site(request, loopback_only())
        if refusal is not None:
            return error_answer(PermissionDenied(refusal))
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            answer = error_answer(
                Unimplemented(f"{request.method} is not a method of {quote(request.path)}")
            )
            answer.set_status(405)
            answer.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            return answer
        except web.HTTPNotFound:
            return error_answer(
                RouteNotFound(
                    f"no route {request.method} {quote(request.path)} (see /v1/openapi.json)"
                )
            )

    return middleware

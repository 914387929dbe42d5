"""The metrics port's HTTP endpoint, served on a daemon thread and stopped cleanly:

- `/metrics`: the registry in the Prometheus exposition format;
- `/healthz`: liveness, 200 from the moment the port listens until the process exits;
- `/readyz`: readiness, 200 only while the server takes calls (its models loaded, not
  draining), 503 otherwise;
- any other path: 404.

Over HTTPS the TLS handshake runs in each connection's own thread (with a timeout), so a client
that connects and stays silent never stalls the others' probes.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry

StartResponse = Callable[..., Any]


_HANDSHAKE_TIMEOUT_S = 10.0  # a client that connects and says nothing holds its thread this long


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scraper holding a connection open never blocks the exit

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: over TLS, the handshake first (the listening socket
        does not do it in accept(), where one silent client would stall every probe)."""
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(_HANDSHAKE_TIMEOUT_S)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError):  # a silent, plain-text or refused client: drop it
                return
        super().finish_request(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes and scrapes every few seconds: no log line for each."""


def _plain(start_response: StartResponse, status: str, body: str) -> Iterable[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _family(host: str, port: int) -> socket.AddressFamily:
    """IPv4 or IPv6, whichever `host` resolves to first (an empty host: IPv4)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def app(self, ready: Callable[[], bool]) -> Callable[[dict[str, Any], StartResponse], Any]:
        """The WSGI app behind the port: `ready()` answers `/readyz`."""
        metrics = prometheus_client.make_wsgi_app(self._registry)

        def route(environ: dict[str, Any], start_response: StartResponse) -> Any:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/healthz":
                return _plain(start_response, "200 OK", "ok\n")
            if path == "/readyz":
                if ready():
                    return _plain(start_response, "200 OK", "ready\n")
                return _plain(start_response, "503 Service Unavailable", "not ready\n")
            return _plain(
                start_response, "404 Not Found", "not found: /metrics, /healthz, /readyz\n"
            )

        return route

    def start(
        self,
        host: str,
        port: int,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        client_cafile: Path | None = None,
        ready: Callable[[], bool] = lambda: True,
    ) -> int:
        """Serve `/metrics`, `/healthz` and `/readyz` (`ready()` decides 200 or 503); returns
        the bound port (`port=0` picks one). With a certificate and key, over HTTPS; with a
        client CA, clients must present a certificate it signed."""
        if self._server is not None:
            raise RuntimeError("metrics HTTP server already running")

        class Server(_Server):
            address_family = _family(host, port)

        server = make_server(host, port, self.app(ready), Server, handler_class=_QuietHandler)
        if certfile and keyfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(certfile), str(keyfile))
            if client_cafile is not None:
                context.load_verify_locations(cafile=str(client_cafile))
                context.verify_mode = ssl.CERT_REQUIRED
            # accept() returns unhandshaken sockets; `_Server.finish_request` shakes hands.
            server.socket = context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        """Stop the server, if running, and release its port. Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

"""The `/metrics` HTTP endpoint: one registry served on a daemon thread, stopped cleanly."""

from __future__ import annotations

import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(
        self,
        host: str,
        port: int,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        client_cafile: Path | None = None,
    ) -> int:
        """Serve `/metrics`; returns the bound port (`port=0` picks one). With a certificate
        and key, over HTTPS; with a client CA, scrapers must present a certificate it signed."""
        if self._server is not None:
            raise RuntimeError("metrics HTTP server already running")
        self._server, self._thread = prometheus_client.start_http_server(
            port,
            addr=host,
            registry=self._registry,
            certfile=str(certfile) if certfile else None,
            keyfile=str(keyfile) if keyfile else None,
            client_cafile=str(client_cafile) if client_cafile else None,
            client_auth_required=client_cafile is not None,
        )
        return int(self._server.server_port)

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

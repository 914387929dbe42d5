"""The metrics port over HTTPS: a client that connects and never starts its TLS handshake holds
only its own thread; probes and scrapes from others are answered meanwhile (the handshake is
not done in accept(), on the single serving thread)."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from service.metrics.http_endpoint import MetricsEndpoint
from tests.api.certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def https_endpoint(certs: Certs) -> Iterator[int]:
    registry = CollectorRegistry()
    Counter("probe_total", "a counter for the test", registry=registry).inc()
    endpoint = MetricsEndpoint(registry)
    port = endpoint.start(
        "127.0.0.1", 0, certfile=certs.files["server.pem"], keyfile=certs.files["server.key"],
        ready=lambda: False,
    )  # fmt: skip
    try:
        yield port
    finally:
        endpoint.stop()


def _get(url: str, cafile: Path, timeout: float) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(cafile))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_silent_connection_does_not_hold_up_probes(https_endpoint: int, certs: Certs) -> None:
    base = f"https://localhost:{https_endpoint}"
    silent = [socket.create_connection(("127.0.0.1", https_endpoint)) for _ in range(3)]
    try:
        time.sleep(0.2)  # the server has accepted them by now
        began = time.monotonic()
        assert _get(f"{base}/healthz", certs.files["ca.pem"], 3.0) == (200, b"ok\n")
        assert _get(f"{base}/readyz", certs.files["ca.pem"], 3.0) == (503, b"not ready\n")
        status, body = _get(f"{base}/metrics", certs.files["ca.pem"], 3.0)
        assert status == 200 and b"probe_total 1.0" in body
        assert time.monotonic() - began < 3.0
    finally:
        for s in silent:
            s.close()


def test_a_plain_text_client_is_dropped_and_https_still_answers(
    https_endpoint: int, certs: Certs
) -> None:
    with socket.create_connection(("127.0.0.1", https_endpoint), timeout=5) as plain:
        plain.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        try:  # the handshake fails: closed, reset or a TLS alert, never an HTTP answer
            answer = plain.recv(1024)
        except ConnectionResetError:
            answer = b""
        assert b"HTTP/" not in answer
    status, _ = _get(f"https://localhost:{https_endpoint}/healthz", certs.files["ca.pem"], 3.0)
    assert status == 200

"""Auth and TLS on the HTTP port are gRPC's: bearer tokens from the same file, a session is
its creator's, TLS with the same certificate, and client certificates with mutual TLS."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.security import tokens as tokens_module
from service.security.tokens import add_token
from tests.api.certs import Certs
from tests.api.conftest import ServerFactory
from tests.api.support import recorded_rpcs, rpc_counts
from tests.http_api.conftest import sse_events


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens"
    return path, {name: add_token(path, name, "client") for name in ("alice", "bob")}


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_tokens_and_ownership_over_http(
    server_factory: ServerFactory, tokens: tuple[Path, dict[str, str]]
) -> None:
    path, tok = tokens
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        refused = await http.get("/v1/models")
        assert refused.status == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await refused.json())["error"]["status"] == "UNAUTHENTICATED"
        bad = await http.get("/v1/models", headers=_bearer("sqs_not-a-token"))
        assert bad.status == 401
        made = await http.post("/v1/sessions", json={"model": "tok"}, headers=_bearer(tok["alice"]))
        assert made.status == 200
        sid = (await made.json())["session"]["sessionId"]
        mine = await http.get(f"/v1/sessions/{sid}", headers=_bearer(tok["alice"]))
        assert mine.status == 200
        theirs = await http.get(f"/v1/sessions/{sid}", headers=_bearer(tok["bob"]))
        assert theirs.status == 404  # another principal's session does not exist for bob
        step = await http.post(
            f"/v1/sessions/{sid}:step", json={"input": {"text": "a"}}, headers=_bearer(tok["bob"])
        )
        assert step.status == 404
        # The page and the OpenAPI document are open: the page asks for a token itself.
        assert (await http.get("/")).status == 200
        assert (await http.get("/v1/openapi.json")).status == 200


async def test_https_with_the_grpc_certificate_and_client_certificates(
    server_factory: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    tls = {"tls_cert": certs.files["server.pem"], "tls_key": certs.files["server.key"],
           "tls_client_ca": certs.files["ca.pem"]}  # fmt: skip
    server = await server_factory(server={"http_port": 0}, security=tls)
    url = f"https://localhost:{server.http_port}"
    trust = ssl.create_default_context(cafile=str(certs.files["ca.pem"]))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):  # no client certificate: the handshake fails
            await http.get(f"{url}/v1/models", ssl=trust)
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to a TLS port
            await http.get(f"http://localhost:{server.http_port}/v1/models")
        alice = tmp_path / "alice.pem"
        alice.write_bytes(certs.clients["alice"].cert + certs.clients["alice"].key)
        trust.load_cert_chain(alice)
        made = await http.post(f"{url}/v1/sessions", json={"model": "tok"}, ssl=trust)
        assert made.status == 200, await made.text()
        sid = (await made.json())["session"]["sessionId"]
        assert (await http.get(f"{url}/v1/sessions/{sid}", ssl=trust)).status == 200
        bob = tmp_path / "bob.pem"
        bob.write_bytes(certs.clients["bob"].cert + certs.clients["bob"].key)
        as_bob = ssl.create_default_context(cafile=str(certs.files["ca.pem"]))
        as_bob.load_cert_chain(bob)
        assert (await http.get(f"{url}/v1/sessions/{sid}", ssl=as_bob)).status == 404


async def test_a_revoked_token_ends_a_generation_streaming_as_events(
    server_factory: ServerFactory,
    tokens: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As gRPC's Generate: the token's line removed while its events stream, the next event is
    an `error` (UNAUTHENTICATED) and the generation stops, long before its max_tokens."""
    monkeypatch.setattr(tokens_module, "_CHECK_EVERY_S", 0.0)  # each check reads the file
    path, tok = tokens
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    limit = 2048
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        made = await http.post("/v1/sessions", json={"model": "tok"}, headers=_bearer(tok["bob"]))
        sid = (await made.json())["session"]["sessionId"]
        body = {"prompt": {"text": "a"}, "sampling": {"maxTokens": limit}}
        response = await http.post(
            f"/v1/sessions/{sid}:generate", json=body, headers=_bearer(tok["bob"])
        )
        assert response.status == 200
        assert (await response.content.readline()).startswith(b"event: token")
        kept = [line for line in path.read_text().splitlines() if not line.startswith("bob ")]
        path.with_suffix(".tmp").write_text("\n".join(kept) + "\n")
        path.with_suffix(".tmp").replace(path)  # as an operator would, atomically
        events = sse_events("event: token\n" + (await response.text()))
        assert events[-1][0] == "error", events[-3:]
        assert events[-1][1]["error"]["status"] == "UNAUTHENTICATED"
        assert "revoked" in events[-1][1]["error"]["message"]
        assert len(events) < limit
        later = await http.get(f"/v1/sessions/{sid}", headers=_bearer(tok["bob"]))
        assert later.status == 401
        # alice's token (not revoked) still works while bob's is refused
        assert (await http.get("/v1/models", headers=_bearer(tok["alice"]))).status == 200


async def test_a_token_revoked_while_the_body_arrives_generates_nothing(
    server_factory: ServerFactory,
    tokens: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The call's principal is taken when its headers arrive, its body read after: a token
    revoked in between (the tokens file re-read meanwhile by another request) must still be
    seen. The answer is a 401 and the session does not move (found by a review: the check
    started from the file as already changed, and the whole generation streamed)."""
    monkeypatch.setattr(tokens_module, "_CHECK_EVERY_S", 0.0)
    path, tok = tokens
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"prompt": {"text": "a"}, '
        await release.wait()
        yield b'"sampling": {"maxTokens": 40}}'

    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        made = await http.post("/v1/sessions", json={"model": "tok"}, headers=_bearer(tok["bob"]))
        sid = (await made.json())["session"]["sessionId"]
        headers = {**_bearer(tok["bob"]), "content-type": "application/json"}
        call = asyncio.ensure_future(
            http.post(f"/v1/sessions/{sid}:generate", data=body(), headers=headers)
        )
        await asyncio.sleep(0.5)  # its headers taken, the handler waits for the body
        before = path.read_text()
        kept = [line for line in before.splitlines() if not line.startswith("bob ")]
        path.with_suffix(".tmp").write_text("\n".join(kept) + "\n")
        path.with_suffix(".tmp").replace(path)
        assert (await http.get("/v1/models", headers=_bearer(tok["alice"]))).status == 200
        release.set()
        response = await call
        assert response.status == 401, await response.text()
        assert (await response.json())["error"]["status"] == "UNAUTHENTICATED"
        path.with_suffix(".tmp").write_text(before)
        path.with_suffix(".tmp").replace(path)  # bob back, to look at his session
        got = await http.get(f"/v1/sessions/{sid}", headers=_bearer(tok["bob"]))
        assert (await got.json())["session"].get("position", "0") == "0"  # nothing applied


def _small_send_buffer(server: Any, client: tuple[str, int]) -> Any:
    """The server's end of the HTTP connection from `client` (its aiohttp handler), now
    sending through a 4 KiB buffer (the kernel would grow it to megabytes of events before a
    write had to wait)."""
    runner = server.parts.http._runner
    for handler in runner.server.connections:
        sock = handler.transport.get_extra_info("socket")
        if sock.getpeername() == client:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            return handler
    raise AssertionError(f"no HTTP connection from {client}")


async def _writes_wait(handler: Any) -> None:
    """Until the handler's writes wait: nothing is read, so the buffers fill, the transport
    pauses its writer and the handler's next drain waits (its buffer stops growing)."""
    deadline = time.monotonic() + 30
    size = -1
    while not handler.writing_paused or handler.transport.get_write_buffer_size() != size:
        assert time.monotonic() < deadline, "the server's writes never had to wait"
        size = handler.transport.get_write_buffer_size()
        await asyncio.sleep(0.5)


async def test_a_revoked_token_ends_a_generation_whose_client_reads_nothing(
    server_factory: ServerFactory,
    tokens: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that stops reading leaves its generation waiting in a write, where the check
    before each event never runs: the revocation watch ends the call (counted UNAUTHENTICATED)
    while the client still reads nothing, and the generation stops, its session free again.
    (Before, the call held the session until its client read again or went away.)"""
    monkeypatch.setattr(tokens_module, "_CHECK_EVERY_S", 0.0)  # bob's return seen at once
    path, tok = tokens
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        made = await http.post("/v1/sessions", json={"model": "tok"}, headers=_bearer(tok["bob"]))
        sid = (await made.json())["session"]["sessionId"]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: fills soon
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.http_port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        try:
            body = json.dumps({"prompt": {"text": "a"}, "sampling": {"maxTokens": 2048}})
            writer.write(
                f"POST /v1/sessions/{sid}:generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {tok['bob']}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"event: token"), timeout=30)
            handler = _small_send_buffer(server, sock.getsockname())  # a slow network
            await _writes_wait(handler)
            original = path.read_text()
            kept = [line for line in original.splitlines() if not line.startswith("bob ")]
            path.with_suffix(".tmp").write_text("\n".join(kept) + "\n")
            path.with_suffix(".tmp").replace(path)  # bob revoked; no call made after it
            counts = await recorded_rpcs(server, "Generate")  # within its 10 s
            assert counts == {"UNAUTHENTICATED": 1.0}, counts
            assert (await http.get("/v1/models", headers=_bearer(tok["alice"]))).status == 200
            path.with_suffix(".tmp").write_text(original)
            path.with_suffix(".tmp").replace(path)  # bob back, to look at his session
            step = await http.post(
                f"/v1/sessions/{sid}:step", json={"input": {"text": "b"}},
                headers=_bearer(tok["bob"]),
            )  # fmt: skip
            assert step.status == 200, await step.text()  # not SESSION_BUSY: the call is over
        finally:
            writer.close()


async def test_100_continue_is_not_sent_to_a_call_refused_before_its_body(
    server_factory: ServerFactory, tokens: tuple[Path, dict[str, str]]
) -> None:
    """`Expect: 100-continue` on a POST without credentials (or another's bad token): the final
    401 at once, not `100 Continue` (the client sent its body to be refused unread), the
    connection closed, and the call counted as refused; with a good token the client is told to
    go on. The over-limit answer of the same kind is counted too."""
    path, tok = tokens
    server = await server_factory(
        server={"http_port": 0, "max_message_bytes": 64 * 1024}, security={"auth_tokens": path}
    )
    body = b'{"input": {"text": "ab"}}'

    async def first_answer(target: str, headers: bytes, length: int = len(body)) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        try:
            writer.write(
                f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                f"\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n".encode()
                + headers + b"\r\n"
            )  # fmt: skip
            # The final answer's head (its JSON body follows; the server then lingers a while
            # for the body it did not ask for before it closes, so EOF is not awaited here).
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        finally:
            writer.close()

    for target, method in [("/v1/sessions", "CreateSession"), ("/v1/sessions/s_x:step", "Step")]:
        for headers in (b"", b"Authorization: Bearer sqs_not-a-token\r\n"):
            head = await first_answer(target, headers)
            assert head.startswith(b"HTTP/1.1 401 "), head
            assert b"\r\nconnection: close" in head.lower(), head
        assert rpc_counts(server, method).get("UNAUTHENTICATED", 0) == 2
    good = f"Authorization: Bearer {tok['alice']}\r\n".encode()
    assert await first_answer("/v1/sessions", good) == b"HTTP/1.1 100 Continue\r\n\r\n"
    head = await first_answer("/v1/sessions", good, length=10**8)
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert rpc_counts(server, "CreateSession").get("INVALID_ARGUMENT", 0) == 1


async def test_an_authorization_header_that_is_not_utf8_is_401_not_500(
    server_factory: ServerFactory, tokens: tuple[Path, dict[str, str]]
) -> None:
    """Raw latin-1 bytes in the token: 401 UNAUTHENTICATED, as any token not in the file (it
    was 500 INTERNAL with a traceback logged: anyone reaching the port could raise the
    error-ratio alert)."""
    path, _ = tokens
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    try:
        writer.write(
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer sqs_\xe9\xe9\r\nConnection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), answer
    assert json.loads(body)["error"]["message"] == "invalid bearer token", body
    assert rpc_counts(server, "ListModels").get("INTERNAL", 0) == 0
    assert rpc_counts(server, "ListModels").get("UNAUTHENTICATED", 0) == 1

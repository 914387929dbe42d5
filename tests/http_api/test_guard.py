"""Before any route: bodies are read whole however they arrive, cross-site browser requests and
DNS rebinding are refused, and paths no route takes get JSON errors."""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
import pytest

from service.api.server import SeqServeServer
from tests.api.certs import Certs
from tests.api.conftest import ServerFactory


async def _raw_post(
    port: int, path: str, body: bytes, pieces: int, pause: float
) -> tuple[int, dict]:
    """POST `body` over a plain socket in `pieces` writes `pause` seconds apart."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    writer.write(head)
    size = -(-len(body) // pieces)
    for k in range(pieces):
        writer.write(body[k * size : (k + 1) * size])
        await writer.drain()
        await asyncio.sleep(pause)
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.split(b"\r\n\r\n", 1)[1]
    return int(status_line.split()[1]), json.loads(payload)


async def test_a_body_that_arrives_in_pieces_is_read_whole(http_server: SeqServeServer) -> None:
    prefix = {"frames": {"values": [0.25] * 3000}}  # ~20 KB of JSON
    body = json.dumps({"model": "frames", "prefix": prefix}).encode()
    status, answer = await _raw_post(http_server.http_port, "/v1/sessions", body, 3, 0.2)
    assert status == 200, answer
    assert answer["session"]["position"] == "1000"


async def test_a_chunked_body_over_the_limit_is_400(server_factory: ServerFactory) -> None:
    server = await server_factory(server={"http_port": 0, "max_message_bytes": 64 * 1024})

    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "tok", "prefix": {"tokens": {"ids": ['
        for _ in range(30_000):  # ~90 KB
            yield b"1, "
        yield b"1]}}}"

    async with aiohttp.ClientSession() as http:
        answer = await http.post(f"http://127.0.0.1:{server.http_port}/v1/sessions", data=chunks())
        body = await answer.json()
    assert answer.status == 400, body
    assert "exceeds the limit" in body["error"]["message"]


async def test_cross_site_and_rebinding_requests_are_refused(
    http_server: SeqServeServer, http: aiohttp.ClientSession
) -> None:
    port = http_server.http_port
    evil = await http.post(
        "/v1/sessions", data='{"model": "tok"}', headers={"Origin": "http://evil.example"}
    )
    assert evil.status == 403
    assert (await evil.json())["error"]["status"] == "PERMISSION_DENIED"
    rebound = await http.get("/v1/models", headers={"Host": f"evil.example:{port}"})
    assert rebound.status == 403
    # The page's own origin, and tools that send no Origin (curl), are served.
    same = await http.post(
        "/v1/sessions", json={"model": "tok"}, headers={"Origin": f"http://127.0.0.1:{port}"}
    )
    assert same.status == 200
    named = await http.get("/v1/models", headers={"Host": f"localhost:{port}"})
    assert named.status == 200


async def test_another_bind_address_takes_any_host(server_factory: ServerFactory) -> None:
    # 0.0.0.0 is not loopback: the Host check is off (TLS and tokens guard such a bind, or
    # --insecure says the network is private); the Origin check stays.
    server = await server_factory(server={"http_port": 0, "host": "0.0.0.0"},
                                  security={"insecure": True})  # fmt: skip
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        assert (await http.get("/v1/models", headers={"Host": "seqserve.example"})).status == 200
        evil = await http.post("/v1/sessions", json={"model": "tok"},
                               headers={"Origin": "http://evil.example"})  # fmt: skip
        assert evil.status == 403


async def test_paths_and_methods_no_route_takes_are_json_errors(
    http: aiohttp.ClientSession,
) -> None:
    missing = await http.get("/nope")
    body = await missing.json()
    assert missing.status == 404 and body["error"]["status"] == "NOT_FOUND"
    assert body["error"]["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    verb = await http.post("/v1/sessions/s_x:dance", json={})
    assert (await verb.json())["error"]["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    wrong = await http.put("/v1/models")
    body = await wrong.json()
    assert wrong.status == 405 and body["error"]["status"] == "UNIMPLEMENTED"
    assert "GET" in wrong.headers["Allow"]


async def _raw_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str, dict]:
    """GET with exactly `headers` (a client library would refuse or mend a malformed Host)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"GET {path} HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), fields["Content-Type"], json.loads(payload)


async def test_a_host_or_origin_that_does_not_parse_is_refused_in_json(
    http_server: SeqServeServer, server_factory: ServerFactory
) -> None:
    port = http_server.http_port
    for headers in ({"Host": "["}, {"Host": "[::1"},
                    {"Host": f"127.0.0.1:{port}", "Origin": "http://["}):  # fmt: skip
        status, kind, body = await _raw_get(port, "/v1/models", headers)
        assert (status, kind.split(";")[0]) == (403, "application/json"), (headers, body)
        assert body["error"]["status"] == "PERMISSION_DENIED", body
    # Bound elsewhere the Host is not checked, and a malformed one is served; Origin still is.
    anywhere = await server_factory(server={"http_port": 0, "host": "0.0.0.0"},
                                    security={"insecure": True})  # fmt: skip
    status, _, body = await _raw_get(anywhere.http_port, "/v1/models", {"Host": "["})
    assert status == 200 and body["models"], body
    status, _, body = await _raw_get(
        anywhere.http_port, "/v1/models", {"Host": "[", "Origin": "http://["}
    )
    assert status == 403 and body["error"]["status"] == "PERMISSION_DENIED", body


@pytest.mark.parametrize(("method", "verb"), [("GET", "fork"), ("DELETE", "step"),
                                              ("GET", "generate")])  # fmt: skip
async def test_another_method_on_a_session_verb_is_405(
    http: aiohttp.ClientSession, method: str, verb: str
) -> None:
    made = await http.post("/v1/sessions", json={"model": "tok"})
    sid = (await made.json())["session"]["sessionId"]
    wrong = await http.request(method, f"/v1/sessions/{sid}:{verb}")
    body = await wrong.json()
    assert wrong.status == 405 and body["error"]["status"] == "UNIMPLEMENTED", body
    assert wrong.headers["Allow"] == "POST"
    # The session is untouched (a DELETE of `:step` closed nothing), and an unknown verb is
    # still an id no session has.
    assert (await http.get(f"/v1/sessions/{sid}")).status == 200
    assert (await http.get(f"/v1/sessions/{sid}:dance")).status == 404


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v1/sessions/{sid}", "DELETE, GET, HEAD"),
        ("PUT", "/v1/sessions/{sid}", "DELETE, GET, HEAD"),
        ("PATCH", "/v1/sessions/{sid}", "DELETE, GET, HEAD"),
        ("PUT", "/v1/sessions/{sid}:fork", "POST"),
        ("PATCH", "/v1/sessions/{sid}:generate", "POST"),
        ("GET", "/v1/sessions", "POST"),
        ("DELETE", "/v1/models/tok", "GET, HEAD"),
        ("POST", "/v1/openapi.json", "GET, HEAD"),
    ],
)
async def test_every_route_path_with_another_method_is_405_with_its_own_allow(
    http: aiohttp.ClientSession, method: str, path: str, allow: str
) -> None:
    """Each path's `Allow` names exactly the methods that path takes: the session's own (not
    the POST of its `:verb` paths, which share the route) and the verbs' POST alone."""
    made = await http.post("/v1/sessions", json={"model": "tok"})
    sid = (await made.json())["session"]["sessionId"]
    wrong = await http.request(method, path.format(sid=sid), json={})
    body = await wrong.json()
    assert wrong.status == 405 and body["error"]["status"] == "UNIMPLEMENTED", body
    assert wrong.headers["Allow"] == allow
    assert (await http.get(f"/v1/sessions/{sid}")).status == 200  # untouched
    for method in allow.split(", "):  # what `Allow` names is taken: no 405 for it
        if method != "DELETE":
            answer = await http.request(method, path.format(sid=sid), json={})
            assert answer.status != 405, (method, path)


@pytest.mark.parametrize(
    ("host", "origin", "forwarded", "status"),
    [
        ("127.0.0.1:{port}", "http://127.0.0.1:{port}", None, 200),
        ("127.0.0.1:{port}", "https://127.0.0.1:{port}", None, 403),  # this port is plain HTTP
        # A proxy in front that ends TLS says so; its page is https://, an http:// one is not.
        ("127.0.0.1:{port}", "https://127.0.0.1:{port}", "https", 200),
        ("127.0.0.1:{port}", "http://127.0.0.1:{port}", "https", 403),
        ("127.0.0.1:{port}", "https://127.0.0.1:{port}", "https, http", 200),  # the first's
        ("127.0.0.1:{port}", "http://127.0.0.1:{port}", "ftp", 403),
        # A port not given is its scheme's default, in Host as in Origin.
        ("localhost", "http://localhost:80", None, 200),
        ("localhost:80", "http://localhost", None, 200),
        ("localhost", "https://localhost", None, 403),
        ("localhost:443", "http://localhost", None, 403),
        ("localhost:443", "https://localhost", "https", 200),
        ("127.0.0.1:{port}", "http://127.0.0.1:{port}0", None, 403),
        ("127.0.0.1:{port}", "http://127.0.0.1:x", None, 403),
        ("127.0.0.1:{port}", "null", None, 403),  # a sandboxed page or a file
    ],
)
async def test_an_origin_is_this_servers_only_with_its_scheme_host_and_port(
    http_server: SeqServeServer, host: str, origin: str, forwarded: str | None, status: int
) -> None:
    port = http_server.http_port
    headers = {"Host": host.format(port=port), "Origin": origin.format(port=port)}
    if forwarded is not None:
        headers["X-Forwarded-Proto"] = forwarded
    got, _, body = await _raw_get(port, "/v1/models", headers)
    assert got == status, (headers, body)
    if status == 403:
        assert body["error"]["status"] == "PERMISSION_DENIED", body


async def test_over_https_an_http_origin_of_the_same_name_and_port_is_refused(
    server_factory: ServerFactory, certs: Certs
) -> None:
    """A page on http://localhost:<port> (one a network attacker could serve: the browser
    would send the visitor's client certificate with its calls) is not the HTTPS port's own."""
    tls = {"tls_cert": certs.files["server.pem"], "tls_key": certs.files["server.key"]}
    server = await server_factory(server={"http_port": 0}, security=tls)
    url = f"https://localhost:{server.http_port}"
    trust = ssl.create_default_context(cafile=str(certs.files["ca.pem"]))
    async with aiohttp.ClientSession() as http:
        for origin, status in ((f"http://localhost:{server.http_port}", 403), (url, 200)):
            answer = await http.post(
                f"{url}/v1/sessions", json={"model": "tok"}, ssl=trust, headers={"Origin": origin}
            )
            assert answer.status == status, (origin, await answer.text())

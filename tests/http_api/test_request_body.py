"""Reading a request's body over a real socket: a body that stops arriving, or that breaks after
its head was taken, is answered (not waited on for as long as the client keeps the connection),
with the API's JSON error body, and the connection is closed."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from service.api.server import SeqServeServer
from tests.api.conftest import ServerFactory
from tests.api.support import rpc_counts

HEAD = b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


class Raw:
    """One connection over a plain socket: what is sent, and the answers read back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def answer(self) -> tuple[bytes, dict]:
        """The next answer's head and its JSON body (by its Content-Length; none: {})."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        body = await asyncio.wait_for(self.reader.readexactly(length), 30)
        return head, json.loads(body) if body else {}

    async def closed(self) -> bool:
        """Whether the server closes the connection with nothing more sent."""
        return await asyncio.wait_for(self.reader.read(), 30) == b""

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize("first", [b"", b'a\r\n{"model": \r\n'])
async def test_a_malformed_chunk_after_the_head_is_answered_400_at_once(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture, first: bytes
) -> None:
    """The head is taken (the call begins) and then a chunk size that is not hex arrives:
    aiohttp's parser queues its error as a next request, and the body being read never ends.
    It is answered 400 at once (the body timeout here is far off), the connection closed, and
    the call counted INVALID_ARGUMENT; a request pipelined behind it is not a request. The
    same when a good chunk comes with the bad one (the read, woken by the good one, was not
    waiting when the error came: the parse error was lost, a generic message given and an
    ERROR logged)."""
    server = await server_factory(server={"http_port": 0, "http_body_timeout_seconds": 600})
    call = await Raw.open(server.http_port)
    try:
        call.writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0.3)  # the head on its own: the call has begun reading the body
        call.writer.write(first + b"zz\r\n" + b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, body = await call.answer()
        assert await call.closed()
    finally:
        call.close()
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"\r\nconnection: close" in head.lower(), head
    error = body["error"]
    assert error["status"] == "INVALID_ARGUMENT", error
    assert error["message"] == "the request body could not be read: BadHttpMessage", error
    assert rpc_counts(server, "CreateSession").get("INVALID_ARGUMENT", 0) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_body_that_stops_arriving_is_408_after_the_body_timeout(
    server_factory: ServerFactory,
) -> None:
    """A body sent in part (a Content-Length one, a chunked one) and then nothing: 408 with
    the JSON error body once `server.http_body_timeout_seconds` have passed, the connection
    closed; the server goes on."""
    server = await server_factory(server={"http_port": 0, "http_body_timeout_seconds": 0.5})
    for framing, part in [
        (b"Content-Length: 40\r\n\r\n", b'{"model": '),
        (b"Transfer-Encoding: chunked\r\n\r\n", b'a\r\n{"model": \r\n'),
    ]:
        call = await Raw.open(server.http_port)
        try:
            call.writer.write(HEAD + framing + part)
            head, body = await call.answer()
            assert await call.closed()
        finally:
            call.close()
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b"\r\nconnection: close" in head.lower(), head
        error = body["error"]
        assert error["status"] == "INVALID_ARGUMENT", error
        assert error["details"][0]["reason"] == "INVALID_ARGUMENT", error
        assert "0.5 s" in error["message"], error
        assert "SEQSERVE_SERVER__HTTP_BODY_TIMEOUT_SECONDS" in error["message"], error
    assert rpc_counts(server, "CreateSession").get("INVALID_ARGUMENT", 0) == 2
    async with aiohttp.ClientSession() as http:  # the document lists it where a body is read
        url = f"http://127.0.0.1:{server.http_port}/v1/openapi.json"
        doc = await (await http.get(url)).json()
    operations = [op for item in doc["paths"].values() for m, op in item.items()]
    assert all(("408" in op["responses"]) == ("requestBody" in op) for op in operations)
    assert len([op for op in operations if "408" in op["responses"]]) == 4
    call = await Raw.open(server.http_port)  # a body that comes whole is read as ever
    try:
        call.writer.write(HEAD + b'Content-Length: 15\r\n\r\n{"model":"tok"}')
        head, body = await call.answer()
    finally:
        call.close()
    assert head.startswith(b"HTTP/1.1 200 "), (head, body)


async def test_a_stuck_body_does_not_hold_a_shutdown_for_its_grace_period(
    server_factory: ServerFactory,
) -> None:
    """The malformed chunk's call is over at once: a shutdown finds no call in flight (it
    waited for the whole grace period, the call never ending)."""
    server = await server_factory(
        server={"http_port": 0, "http_body_timeout_seconds": 600, "grace_seconds": 600}
    )
    call = await Raw.open(server.http_port)
    try:
        call.writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0.3)
        call.writer.write(b"zz\r\n")
        await call.answer()
        await asyncio.wait_for(server.parts.http.calls.settled(), 30)
    finally:
        call.close()


async def _session(http: aiohttp.ClientSession) -> str:
    made = await http.post("/v1/sessions", json={"model": "tok"})
    assert made.status == 200, await made.text()
    return (await made.json())["session"]["sessionId"]


async def _position(http: aiohttp.ClientSession, sid: str) -> str:
    return (await (await http.get(f"/v1/sessions/{sid}")).json())["session"]["position"]


@pytest.mark.parametrize(
    "coding", ["foo", "br", "zstd", "compress", "gzip, deflate", "x-gzip, identity"]
)
async def test_a_content_encoding_the_server_does_not_read_is_415(
    http: aiohttp.ClientSession, http_server: SeqServeServer, coding: str
) -> None:
    """An unknown coding was read as none (200), `br` and `zstd` refused by aiohttp's parser
    with advice to install a library (and not counted): each is 415 with the JSON error body
    (UNIMPLEMENTED, as gRPC answers a `grpc-encoding` it does not read), `Accept-Encoding`
    naming those read, and the connection closed. The body is not applied; the call is
    counted as every refused call."""
    sid = await _session(http)
    answer = await http.post(
        f"/v1/sessions/{sid}:step",
        data=b'{"input": {"text": "ab"}}',
        headers={"Content-Encoding": coding, "Content-Type": "application/json"},
    )
    body = await answer.json()
    assert answer.status == 415, body
    assert answer.headers["Accept-Encoding"] == "gzip, deflate"
    assert answer.headers["Connection"] == "close"
    error = body["error"]
    assert error["status"] == "UNIMPLEMENTED", error
    assert error["details"][0]["reason"] == "UNIMPLEMENTED", error
    assert "Content-Encoding" in error["message"], error
    assert "install" not in error["message"].lower(), error
    assert await _position(http, sid) == "0"
    assert rpc_counts(http_server, "Step").get("UNIMPLEMENTED", 0) == 1


async def test_x_gzip_is_read_as_gzip_and_identity_as_none(http: aiohttp.ClientSession) -> None:
    """RFC 9110 8.4.1.3: a recipient SHOULD consider x-gzip equivalent to gzip."""
    sid = await _session(http)
    for coding, data in [
        ("x-gzip", gzip.compress(b'{"input": {"text": "ab"}}')),
        ("X-Gzip", gzip.compress(b'{"input": {"text": "c"}}') * 1),
        ("identity", b'{"input": {"text": "d"}}'),
    ]:
        answer = await http.post(
            f"/v1/sessions/{sid}:step", data=data, headers={"Content-Encoding": coding}
        )
        assert answer.status == 200, (coding, await answer.text())
    assert await _position(http, sid) == "4"
    # Two gzip members are one body, as gzip reads them; bytes that are not gzip are 400.
    packed = gzip.compress(b'{"input": ') + gzip.compress(b'{"text": "e"}}')
    answer = await http.post(
        f"/v1/sessions/{sid}:step", data=packed, headers={"Content-Encoding": "x-gzip"}
    )
    assert answer.status == 200, await answer.text()
    for broken in (b"not compressed", gzip.compress(b'{"input": {"text": "f"}}')[:-5]):
        answer = await http.post(
            f"/v1/sessions/{sid}:step", data=broken, headers={"Content-Encoding": "x-gzip"}
        )
        error = (await answer.json())["error"]
        assert answer.status == 400, error
        assert "does not decode as its Content-Encoding, 'x-gzip'" in error["message"], error
    assert await _position(http, sid) == "5"


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate"])
async def test_a_coded_body_is_read_to_its_end_and_no_further(
    http: aiohttp.ClientSession, coding: str
) -> None:
    """The server decodes a body itself: aiohttp checked neither a gzip member's trailer (a
    body cut inside its CRC was applied) nor bytes after the end, and refused a cut deflate
    body as a coding not read (415). A body cut anywhere, or with bytes after its end, is 400
    and not applied; deflate is read with zlib's header or without; an empty body is empty."""
    sid = await _session(http)

    def pack(data: bytes) -> bytes:
        return zlib.compress(data) if coding == "deflate" else gzip.compress(data)

    whole = pack(b'{"input": {"text": "ab"}}')
    for broken in (whole[:-1], whole[:-4], whole[: len(whole) // 2], whole + b"x"):
        answer = await http.post(
            f"/v1/sessions/{sid}:step", data=broken, headers={"Content-Encoding": coding}
        )
        error = (await answer.json())["error"]
        assert answer.status == 400, (broken, error)
        assert f"does not decode as its Content-Encoding, '{coding}'" in error["message"], error
    assert await _position(http, sid) == "0"
    raw_deflate = zlib.compressobj(wbits=-15)
    bare = raw_deflate.compress(b'{"input": {"text": "cd"}}') + raw_deflate.flush()
    for data in (whole, bare if coding == "deflate" else pack(b'{"input": {"text": "cd"}}')):
        answer = await http.post(
            f"/v1/sessions/{sid}:step", data=data, headers={"Content-Encoding": coding}
        )
        assert answer.status == 200, await answer.text()
    assert await _position(http, sid) == "4"
    # An empty body is `{}` whatever its coding (no model named: 404, as with no coding).
    plain = await http.post("/v1/sessions", data=b"")
    coded = await http.post("/v1/sessions", data=b"", headers={"Content-Encoding": coding})
    assert (coded.status, await coded.json()) == (plain.status, await plain.json())
    assert (await coded.json())["error"]["details"][0]["reason"] == "MODEL_NOT_FOUND"


async def test_the_document_lists_415_where_a_body_is_read(http: aiohttp.ClientSession) -> None:
    doc = await (await http.get("/v1/openapi.json")).json()
    operations = [op for item in doc["paths"].values() for op in item.values()]
    assert all(("415" in op["responses"]) == ("requestBody" in op) for op in operations)
    headers = doc["components"]["responses"]["UnsupportedMediaType"]["headers"]
    assert "Accept-Encoding" in headers


async def test_100_continue_is_not_sent_for_a_body_over_the_limit(
    server_factory: ServerFactory,
) -> None:
    """`Expect: 100-continue` with a Content-Length over `server.max_message_bytes`: the final
    400 at once (what the size check answers once the body is in), no `100 Continue` first
    (the client would send 100 MB to be refused), and the connection closed. Under the limit
    the client is still told to go on."""
    server = await server_factory(server={"http_port": 0, "max_message_bytes": 64 * 1024})
    call = await Raw.open(server.http_port)
    try:
        call.writer.write(HEAD + b"Content-Length: 104857600\r\nExpect: 100-continue\r\n\r\n")
        head, body = await call.answer()
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert await call.closed()
    finally:
        call.close()
    assert b"\r\nconnection: close" in head.lower(), head
    error = body["error"]
    assert error["status"] == "INVALID_ARGUMENT", error
    assert "104857600 bytes exceeds the limit of 65536" in error["message"], error
    call = await Raw.open(server.http_port)
    try:
        call.writer.write(HEAD + b"Content-Length: 65536\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(call.reader.readuntil(b"\r\n\r\n"), 30)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    finally:
        call.close()


async def test_a_body_over_the_limit_whose_size_is_not_known_is_not_given_one(
    server_factory: ServerFactory,
) -> None:
    """A chunked or compressed body is cut off at the limit, its size unknown: the message
    says it is over the limit, not that it was the limit plus one byte (and a Content-Length
    one is told its size)."""
    limit = 64 * 1024
    server = await server_factory(server={"http_port": 0, "max_message_bytes": limit})
    big = b'{"model": "' + b"a" * (4 * limit) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        for coding, data in [
            ("gzip", gzip.compress(big)),
            ("x-gzip", gzip.compress(big)),
            ("deflate", zlib.compress(big)),
            ("", chunks()),
        ]:
            headers = {"Content-Encoding": coding} if coding else {}
            answer = await http.post("/v1/sessions", data=data, headers=headers)
            error = (await answer.json())["error"]
            assert answer.status == 400, (coding, error)
            message = error["message"]
            assert f"exceeds the limit of {limit} bytes" in message, (coding, message)
            assert str(limit + 1) not in message and " of 0 " not in message, (coding, message)
        answer = await http.post("/v1/sessions", data=big)
        message = (await answer.json())["error"]["message"]
        assert f"request body of {len(big)} bytes exceeds the limit of {limit}" in message

"""Requests aiohttp cannot parse (an over-long `Authorization` header, a malformed request line or
header) over a real socket: each is refused with the API's JSON error body (400
INVALID_ARGUMENT), and the server's log gets one line; neither quotes what the client sent."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    LineTooLong,
)

from service.api.server import SeqServeServer
from service.http import protocol
from service.security.tokens import add_token
from tests.api.conftest import ServerFactory, make_settings

OVER_LIMIT = 9000
CLOSED = "the connection is closed"  # aiohttp's limit on a header line is 8190 bytes


async def test_an_over_long_authorization_header_puts_no_token_in_the_log(
    server_factory: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    token = add_token(path, "alice", "client")
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    url = f"http://127.0.0.1:{server.http_port}/v1/models"
    header = f"Bearer {token} {'x' * OVER_LIMIT}"
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers={"Authorization": header}) as answer:
                assert answer.status == 400
                error = (await answer.json())["error"]
                assert error["status"] == "INVALID_ARGUMENT", error
                assert "LineTooLong" in error["message"] and token[4:12] not in error["message"]
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as answer:
                assert answer.status == 200  # the server goes on
    assert token[4:12] not in caplog.text  # not even the start of its random part
    refused = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert len(refused) == 1, [r.getMessage() for r in refused]
    assert refused[0].levelno == logging.WARNING
    assert refused[0].exc_info is None  # no traceback
    assert "LineTooLong" in refused[0].getMessage()


async def _raw(port: int, request: bytes) -> tuple[bytes, bytes]:
    """`request` sent over a plain socket; the answer's head and body, read until the server
    closes the connection (an answer to a request that does not parse closes it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    ("request_bytes", "kind"),
    [
        (b"GARBAGE /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "BadHttpMethod"),
        (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n", "BadHttpMessage"),
        (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"y" * OVER_LIMIT + b"\r\n\r\n",
         "LineTooLong"),
        (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n",
         "BadHttpMessage"),
        # A malformed chunk that arrives with the head is aiohttp's to refuse too.
        (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"zz\r\n", "BadHttpMessage"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "BadHttpMethod"),  # a TLS hello
        # Targets aiohttp cannot parse: its message is then often the target itself.
        (b"GET v1/models?token=sekrit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "InvalidURLError"),
        (b"GET http://[::1/?token=sekrit HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
         "InvalidURLError"),
    ],
)  # fmt: skip
async def test_a_request_that_does_not_parse_gets_the_json_error_body(
    http_server: SeqServeServer, request_bytes: bytes, kind: str
) -> None:
    head, body = await _raw(http_server.http_port, request_bytes)
    assert head.startswith(b"HTTP/1.0 400 "), head
    assert b"\r\ncontent-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["code"] == 3 and error["status"] == "INVALID_ARGUMENT", error
    assert error["details"][0]["reason"] == "INVALID_ARGUMENT", error
    assert error["message"].startswith(f"the request could not be read as HTTP/1.1 ({kind}")
    for sent in (b"GARBAGE", b"Bad Header", b"yyyy", b"zz", b"sekrit"):  # nothing it sent
        assert sent.decode() not in error["message"], error
    # The server goes on.
    url = f"http://127.0.0.1:{http_server.http_port}/v1/models"
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        assert answer.status == 200


@pytest.mark.parametrize(
    ("request_bytes", "words"),
    [
        (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         "BadHttpMessage: \"Transfer-Encoding can't be present with Content-Length\")"),
        (b"GET /v1/models HTTP/1.1\r\n\r\n",
         "BadHttpMessage: \"Missing 'Host' header in request\")"),
        (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n",
         "BadHttpMessage: \"Duplicate 'Host' header found\")"),
        (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x'y\r\n\r\n",
         "BadHttpMessage: 'Invalid character in Content-Length')"),
    ],
)  # fmt: skip
async def test_aiohttps_words_on_a_request_are_given_whole(
    http_server: SeqServeServer, request_bytes: bytes, words: str
) -> None:
    """aiohttp's own description of what is wrong, whole (it was cut at its first quote
    character: `'Transfer-Encoding can'`, `'Missing'`), without what the client sent."""
    _, body = await _raw(http_server.http_port, request_bytes)
    message = json.loads(body)["error"]["message"]
    assert message == f"the request could not be read as HTTP/1.1 ({words}; {CLOSED}"
    assert "x'y" not in message


@pytest.mark.parametrize(
    "error",
    [
        LineTooLong(b"Bearer sekrit'x\"y" + b"z" * 100, 8190),
        LineTooLong("Bearer sekrit", 8190),
        InvalidHeader(b"sekrit: 'x'"),
        BadStatusLine("sekrit'\"line"),
        BadHttpMethod("sekrit'line"),
        BadHttpMessage("Invalid header value char:\n\n  b'sekrit: \\x01'\n    ^"),
    ],
)
def test_the_bytes_aiohttp_quotes_after_its_words_are_left_out(error: Exception) -> None:
    message = protocol.parse_error(error).message
    assert "sekrit" not in message, message
    assert type(error).__name__ in message, message


_PLACEHOLDERS = {"{id}": "s_x:step", "{model}": "tok", "{name}": "playground.js"}


def _every_route(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) for each route the server has, its placeholders filled in; `*` asked
    with PUT (a method no other route of the path takes). HEAD is left out: its answer has no
    body to read."""
    routes = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        for placeholder, value in _PLACEHOLDERS.items():
            path = path.replace(placeholder, value)
        assert "{" not in path, f"a placeholder this test cannot fill: {path}"
        method = "PUT" if route.method == "*" else route.method
        if method != "HEAD":
            routes.append((method, path))
    return routes


async def test_an_expectation_other_than_100_continue_gets_the_json_error_body(
    http_server: SeqServeServer,
) -> None:
    """aiohttp answers it with a text/plain 417 quoting the header; on every route (the API's,
    the page's, read from the server's own router, so a route added without the handler is
    caught) here the JSON 400 every other refusal has, quoting nothing, and the connection is
    closed (the body is not read)."""
    routes = _every_route(http_server.parts.http.app)
    assert len(routes) >= 10  # the API's seven, the document, the page and its files
    for method, path in routes:
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Expect: sekrit-continue\r\nContent-Length: 2\r\n\r\n{}"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", http_server.http_port)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 400 "), (method, path, head)
            body = await asyncio.wait_for(reader.read(), 30)  # then closed
        finally:
            writer.close()
        assert b"\r\ncontent-type: application/json" in head.lower(), (method, path, head)
        error = json.loads(body)["error"]
        assert error["status"] == "INVALID_ARGUMENT", (method, path, error)
        assert "Expect" in error["message"] and "sekrit" not in error["message"], error


async def test_100_continue_is_answered_before_the_body_is_sent(
    http_server: SeqServeServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", http_server.http_port)
    try:
        writer.write(
            b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nExpect: 100-continue\r\nContent-Length: 17\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b'{"model": "tok"} ')
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        writer.close()


async def test_a_handler_that_fails_outside_the_routes_gets_the_json_internal_error(
    store_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own 500 (a handler raising past every middleware; the routes answer their
    errors themselves) is the JSON INTERNAL with an error id, logged with its traceback."""

    async def broken(_: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    server = SeqServeServer(make_settings(store_root, tmp_path, server={"http_port": 0}))
    server.parts.http.app.router.add_get("/broken", broken)  # a route with a bug
    await server.start()
    try:
        with caplog.at_level(logging.ERROR):
            head, body = await _raw(
                server.http_port, b"GET /broken HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
    finally:
        await server.stop()
    assert head.startswith(b"HTTP/1.1 500 "), head
    assert b"\r\ncontent-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["status"] == "INTERNAL", error
    error_id = error["details"][0]["metadata"]["error_id"]
    assert "a bug" not in error["message"] and error_id in error["message"]
    (logged,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged.exc_info is not None  # the traceback is in the log, not in the answer


@pytest.mark.parametrize("where", ["server", "connection"])
async def test_an_aiohttp_whose_internals_differ_still_serves_with_its_own_text_answers(
    server_factory: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    """The JSON answers rest on aiohttp's internals (`protocol.py`); where a later aiohttp
    changed them, its own server or connection is used, with one warning: every request is
    still served, and one it cannot parse gets its text answer."""

    def changed(*_args: object, **_kwargs: object) -> None:
        raise TypeError("an unexpected keyword argument")  # as a changed signature would

    target = protocol.JsonErrorServer if where == "server" else protocol.JsonErrorHandler
    monkeypatch.setattr(target, "__init__", changed)
    monkeypatch.setattr(protocol, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=protocol.__name__):
        server = await server_factory(server={"http_port": 0})
        url = f"http://127.0.0.1:{server.http_port}/v1/models"
        async with aiohttp.ClientSession() as http, http.get(url) as answer:
            assert answer.status == 200 and answer.content_type == "application/json"
            assert {m["name"] for m in (await answer.json())["models"]} == {"frames", "tok"}
        head, _ = await _raw(server.http_port, b"GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ") and b"text/plain" in head.lower(), head
    warned = [r for r in caplog.records if "written against" in r.getMessage()]
    assert len(warned) == 1

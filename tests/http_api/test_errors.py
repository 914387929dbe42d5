"""Errors over HTTP, provoked for real: each gets the status the gRPC → HTTP mapping gives its
gRPC code, a JSON error body, and leaves the session (and the server) as they were."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from service.api.server import SeqServeServer
from service.http.calls import _fields_named_once
from tests.api.conftest import ServerFactory, make_settings

FieldType = descriptor_pb2.FieldDescriptorProto.Type
Label = descriptor_pb2.FieldDescriptorProto.Label


async def _error(response: aiohttp.ClientResponse, http_status: int, status: str) -> dict:
    body = await response.json()
    assert response.status == http_status, body
    assert body["error"]["status"] == status, body
    assert body["error"]["message"]
    return body["error"]


async def _session(http: aiohttp.ClientSession, **fields: object) -> str:
    response = await http.post("/v1/sessions", json={"model": "tok", **fields})
    assert response.status == 200, await response.text()
    return (await response.json())["session"]["sessionId"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('{"model": "tok",', "not a valid JSON"),
        ('{"model": "tok", "color": "red"}', "color"),
        ('{"model": 12}', "model"),
        ("[1, 2]", "not a valid JSON"),
        (b"\xff\xfe", "not a valid JSON"),
        ("[]", "a JSON array, not an object"),
        ('""', "a JSON string, not an object"),
        ('"model"', "a JSON string, not an object"),
        ("null", "a JSON null, not an object"),
        ('{"model": "tok", "model": "tok"}', "duplicate key 'model'"),
        ('{"model": "tok", "prefix": {"text": "a", "text": "b"}}', "duplicate key 'text'"),
        # One field under its JSON name and its proto name is given twice too.
        (
            '{"model": "tok", "requestId": "x", "request_id": "y"}',
            "field 'request_id' given twice, as 'requestId' and 'request_id'",
        ),
        (
            '{"model": "tok", "request_id": "x", "requestId": "y"}',
            "field 'request_id' given twice, as 'request_id' and 'requestId'",
        ),
        ('{"model": "tok", "requestId": null, "request_id": "y"}', "'request_id' given twice"),
        (
            '{"model": "tok", "defaultSampling": {"stopStrings": ["a"], "stop_strings": ["b"]}}',
            "field 'default_sampling.stop_strings' given twice",
        ),
        (
            '{"model": "tok", "prefix": {"tokens": {"ids": [1]}, "text": "a"}, "ttl": "5s", '
            '"default_sampling": {"maxTokens": 2, "max_tokens": 3}}',
            "field 'default_sampling.max_tokens' given twice",
        ),
    ],
)
async def test_a_body_that_is_not_the_request_is_400(
    http: aiohttp.ClientSession, body: str | bytes, words: str
) -> None:
    error = await _error(await http.post("/v1/sessions", data=body), 400, "INVALID_ARGUMENT")
    assert words in error["message"]


async def test_a_step_option_given_under_both_its_names_is_400_and_steps_nothing(
    http: aiohttp.ClientSession,
) -> None:
    sid = await _session(http)
    body = '{"input": {"text": "a"}, "options": {"topK": 2, "top_k": 9}}'
    error = await _error(
        await http.post(f"/v1/sessions/{sid}:step", data=body), 400, "INVALID_ARGUMENT"
    )
    assert "field 'options.top_k' given twice, as 'topK' and 'top_k'" in error["message"], error
    session = await (await http.get(f"/v1/sessions/{sid}")).json()
    assert session["session"]["position"] == "0"
    # Each name once, in its own object, is as ever: the JSON name or the proto name.
    for name in ("topK", "top_k"):
        body = f'{{"input": {{"text": "a"}}, "options": {{"{name}": 2}}, "request_id": "{name}"}}'
        answer = await http.post(f"/v1/sessions/{sid}:step", data=body)
        assert answer.status == 200, await answer.text()
        assert len((await answer.json())["prediction"]["tokens"]["top"]) == 2


@pytest.mark.parametrize("body", ["[]", '""', '"maxTokens"'])
async def test_a_generate_body_that_is_no_object_is_400_and_generates_nothing(
    http: aiohttp.ClientSession, body: str
) -> None:
    sid = await _session(http)
    await _error(await http.post(f"/v1/sessions/{sid}:generate", data=body), 400,
                 "INVALID_ARGUMENT")  # fmt: skip
    session = await (await http.get(f"/v1/sessions/{sid}")).json()
    assert session["session"]["position"] == "0"


async def test_bad_input_is_400_and_the_session_goes_on(http: aiohttp.ClientSession) -> None:
    sid = await _session(http)
    bad = {"input": {"tokens": {"ids": [1, 999]}}}  # the vocabulary is 256
    await _error(await http.post(f"/v1/sessions/{sid}:step", json=bad), 400, "INVALID_ARGUMENT")
    other = {"sessionId": "s_else", "input": {"text": "a"}}
    error = await _error(
        await http.post(f"/v1/sessions/{sid}:step", json=other), 400, "INVALID_ARGUMENT"
    )
    assert "path" in error["message"]
    good = await http.post(f"/v1/sessions/{sid}:step", json={"input": {"text": "ab"}})
    assert (await good.json())["position"] == "2"  # nothing of the bad calls was applied


async def test_unknown_things_are_404(http: aiohttp.ClientSession) -> None:
    await _error(await http.get("/v1/sessions/s_nobody"), 404, "NOT_FOUND")
    await _error(await http.delete("/v1/sessions/s_nobody"), 404, "NOT_FOUND")
    step = {"input": {"text": "a"}}
    await _error(await http.post("/v1/sessions/s_nobody:step", json=step), 404, "NOT_FOUND")
    await _error(await http.get("/v1/models/nomodel"), 404, "NOT_FOUND")
    await _error(await http.post("/v1/sessions", json={"model": "nomodel"}), 404, "NOT_FOUND")
    await _error(
        await http.post("/v1/sessions", json={"model": "tok", "version": "9"}), 404, "NOT_FOUND"
    )
    await _error(await http.post("/v1/sessions/s_x:dance", json={}), 404, "NOT_FOUND")


async def test_a_wrong_expected_position_is_400_failed_precondition(
    http: aiohttp.ClientSession,
) -> None:
    sid = await _session(http, prefix={"text": "abc"})
    step = {"input": {"text": "d"}, "expectedPosition": "1"}
    await _error(await http.post(f"/v1/sessions/{sid}:step", json=step), 400, "FAILED_PRECONDITION")
    await _error(
        await http.post(f"/v1/sessions/{sid}:generate", json={"expectedPosition": "7"}),
        400, "FAILED_PRECONDITION",
    )  # fmt: skip


async def test_over_the_session_cap_is_429(server_factory: ServerFactory) -> None:
    server = await server_factory(server={"http_port": 0}, sessions={"max_sessions": 1})
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        await _session(http)
        await _error(
            await http.post("/v1/sessions", json={"model": "tok"}), 429, "RESOURCE_EXHAUSTED"
        )


async def test_a_body_over_the_message_limit_is_400(server_factory: ServerFactory) -> None:
    server = await server_factory(server={"http_port": 0, "max_message_bytes": 64 * 1024})
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        sid = await _session(http)
        big = {"input": {"tokens": {"ids": [1] * 30_000}}}  # ~90 KB of JSON
        error = await _error(
            await http.post(f"/v1/sessions/{sid}:step", json=big), 400, "INVALID_ARGUMENT"
        )
        assert "exceeds the limit" in error["message"]
        ok = await http.post(f"/v1/sessions/{sid}:step", json={"input": {"text": "a"}})
        assert ok.status == 200


async def test_before_ready_and_while_draining_it_is_503(
    store_root: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    starting = SeqServeServer(make_settings(store_root, tmp_path / "s", server={"http_port": 0}))
    await starting.listen()  # bound, not open: start-up still running
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{starting.http_port}") as http:
            await _error(await http.get("/v1/models"), 503, "UNAVAILABLE")
    finally:
        await starting.stop()
    server = await server_factory(server={"http_port": 0})
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        sid = await _session(http)
        server.parts.http.begin_draining()  # what stop() does first
        error = await _error(await http.get(f"/v1/sessions/{sid}"), 503, "UNAVAILABLE")
        assert "draining" in error["message"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_400(
    http: aiohttp.ClientSession,
    http_server: SeqServeServer,
    encoding: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = await _session(http)
    body = b'{"input": {"text": "ab"}}'
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    # Bytes that are not of the coding at all, and a body of it cut short (its end missing:
    # 400 too, not the 415 of a coding the server does not read).
    for broken in (b"not compressed at all", packed[:-6]):
        for url in (f"/v1/sessions/{sid}:step", "/v1/sessions", f"/v1/sessions/{sid}:generate"):
            answer = await http.post(url, data=broken, headers={"Content-Encoding": encoding})
            error = await _error(answer, 400, "INVALID_ARGUMENT")
            assert "does not decode as its Content-Encoding" in error["message"], error
            # Read whole before it was decoded: the connection serves on.
            assert answer.headers.get("Connection", "keep-alive") == "keep-alive"
    session = await (await http.get(f"/v1/sessions/{sid}")).json()
    assert session["session"]["position"] == "0"
    assert 'code="INTERNAL"' not in http_server.metrics.render().decode()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # A body that does decode as it says is read as usual.
    packed = zlib.compress(b'{"input": {"text": "ab"}}')
    answer = await http.post(
        f"/v1/sessions/{sid}:step", data=packed, headers={"Content-Encoding": "deflate"}
    )
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["position"] == "2"


def _map_message() -> Any:
    """A message `t.Outer` with `by_name: map<string, t.Inner>` and `counts: map<string,
    int32>`, `t.Inner` with `top_k` (no request message of the API has a map field)."""
    file = descriptor_pb2.FileDescriptorProto(name="t_map.proto", package="t", syntax="proto3")
    inner = file.message_type.add(name="Inner")
    inner.field.add(name="top_k", number=1, type=FieldType.TYPE_INT32, label=Label.LABEL_OPTIONAL)
    outer = file.message_type.add(name="Outer")
    for name, number, value in (("by_name", 1, ".t.Inner"), ("counts", 2, "")):
        entry = outer.nested_type.add(name=f"{name.title().replace('_', '')}Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=FieldType.TYPE_STRING,
                        label=Label.LABEL_OPTIONAL)  # fmt: skip
        field = entry.field.add(name="value", number=2, label=Label.LABEL_OPTIONAL,
                                type=FieldType.TYPE_INT32)  # fmt: skip
        if value:
            field.type, field.type_name = FieldType.TYPE_MESSAGE, value
        outer.field.add(name=name, number=number, type=FieldType.TYPE_MESSAGE,
                        label=Label.LABEL_REPEATED, type_name=f".t.Outer.{entry.name}")  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool.FindMessageTypeByName("t.Outer")


def test_a_map_fields_keys_are_data_and_its_message_values_are_looked_into() -> None:
    outer = _map_message()
    document = {"counts": {"topK": 1, "top_k": 2}, "byName": {"topK": {"topK": 1}, "top_k": {}}}
    _fields_named_once(document, outer)  # keys that look like one field's two names: data
    twice = {"by_name": {"a": {"topK": 1, "top_k": 2}}}
    with pytest.raises(ValueError, match=r"field 'by_name.top_k' given twice"):
        _fields_named_once(twice, outer)
    with pytest.raises(ValueError, match=r"field 'by_name' given twice, as 'byName' and"):
        _fields_named_once({"byName": {}, "by_name": {}}, outer)

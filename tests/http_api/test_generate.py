"""`POST /v1/sessions/{id}:generate` as server-sent events: the same tokens as gRPC's Generate
for the same seed, a final `done` event, a client that hangs up cancels the generation, and a
generation that outlives a shutdown's grace period ends with a DRAINING `error` event."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc

from service.api.server import SeqServeServer
from service.http.calls import to_json
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from tests.api.conftest import ServerFactory

from .conftest import sse_events

SAMPLING = {"temperature": 0.9, "topK": 20, "maxTokens": 12}


async def _create(http: aiohttp.ClientSession, seed: int) -> str:
    response = await http.post("/v1/sessions", json={"model": "tok", "seed": str(seed)})
    return (await response.json())["session"]["sessionId"]


async def test_events_carry_the_tokens_grpc_would_send(
    http: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    sid = await _create(http, seed=11)
    body = {"prompt": {"text": "ab"}, "sampling": SAMPLING}
    response = await http.post(f"/v1/sessions/{sid}:generate", json=body)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(await response.text())

    stub = pb_grpc.SessionServiceStub(channel)
    twin = (await stub.CreateSession(pb.CreateSessionRequest(model="tok", seed=11))).session
    replies = [
        to_json(r)
        async for r in stub.Generate(
            pb.GenerateRequest(
                session_id=twin.session_id, prompt=types.Input(text="ab"),
                sampling=types.Sampling(temperature=0.9, top_k=20, max_tokens=12),
            )
        )
    ]  # fmt: skip
    tokens = [data for event, data in events if event == "token"]
    assert [t["token"] for t in tokens] == [r["token"] for r in replies]
    assert [t["position"] for t in tokens] == [str(p) for p in range(3, 15)]
    assert events[-1] == (
        "done", {"sessionId": sid, "position": "14", "finishReason": "FINISH_REASON_MAX_TOKENS"}
    )  # fmt: skip
    # The generated tokens are in the session: it goes on from there.
    got = await (await http.get(f"/v1/sessions/{sid}")).json()
    assert got["session"]["position"] == "14"


async def test_an_error_before_the_first_token_is_a_json_answer(
    http: aiohttp.ClientSession,
) -> None:
    response = await http.post("/v1/sessions/s_nobody:generate", json={})
    assert response.status == 404
    assert (await response.json())["error"]["status"] == "NOT_FOUND"
    sid = await _create(http, seed=1)
    bad = {"sampling": {"temperature": -1}}
    response = await http.post(f"/v1/sessions/{sid}:generate", json=bad)
    assert response.status == 400
    assert (await response.json())["error"]["status"] == "INVALID_ARGUMENT"


async def test_hanging_up_cancels_the_generation(
    http_server: SeqServeServer, http: aiohttp.ClientSession
) -> None:
    sid = await _create(http, seed=5)
    limit = http_server.settings.engine.max_generate_tokens
    body = {"sampling": {"maxTokens": limit, "temperature": 1.0}}
    response = await http.post(f"/v1/sessions/{sid}:generate", json=body)
    assert response.status == 200
    seen = 0
    async for line in response.content:
        if line.startswith(b"event: token"):
            seen += 1
            if seen == 3:
                break
    response.close()  # the client goes away mid-generation

    # The session stops moving well short of max_tokens, and takes the next call at once.
    last, still_since = -1, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = await (await http.get(f"/v1/sessions/{sid}")).json()
        position = int(got["session"]["position"])
        if position != last:
            last, still_since = position, time.monotonic()
        elif time.monotonic() - still_since > 0.5:
            break
        await asyncio.sleep(0.05)
    assert 3 <= last < limit, last
    step = await http.post(
        f"/v1/sessions/{sid}:step", json={"input": {"text": "z"}, "expectedPosition": str(last)}
    )
    assert step.status == 200, await step.text()
    exposition = http_server.metrics.render().decode()
    assert (
        'seqserve_rpc_duration_seconds_count{code="CANCELLED",method="Generate",protocol="http"}'
        in exposition
    )


async def test_a_generation_past_the_shutdown_grace_ends_with_a_draining_error(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(
        server={"http_port": 0, "grace_seconds": 0.5}, max_generate_tokens=10_000_000
    )
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        sid = await _create(http, seed=3)
        body = {"sampling": {"maxTokens": 10_000_000, "temperature": 1.0}}
        response = await http.post(f"/v1/sessions/{sid}:generate", json=body)
        assert response.status == 200
        first = await response.content.readuntil(b"\n\n")
        assert first.startswith(b"event: token"), first
        stopping = asyncio.create_task(server.stop())  # as SIGTERM does
        rest = asyncio.create_task(response.read())
        # Within the grace period the listener is still open: a new call, on a connection of
        # its own, is refused with the JSON 503 (DRAINING), not a refused connection.
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as other:
            refused = await other.get("/v1/models")
            assert refused.status == 503
            error = (await refused.json())["error"]
            assert error["details"][0]["reason"] == "DRAINING", error
        # The whole body arrives, finished (no ClientPayloadError), its last event the error.
        events = sse_events((first + await rest).decode())
        await stopping
    assert events[0][0] == "token"
    assert {event for event, _ in events[:-1]} == {"token"}
    event, data = events[-1]
    assert event == "error", events[-3:]
    assert data["error"]["status"] == "UNAVAILABLE", data
    assert data["error"]["details"][0]["reason"] == "DRAINING", data
    assert (
        'seqserve_rpc_duration_seconds_count{code="UNAVAILABLE",method="Generate",protocol="http"}'
        in server.metrics.render().decode()
    )


async def test_a_shutdown_with_no_call_in_flight_does_not_wait_for_the_grace_period(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(server={"http_port": 0, "grace_seconds": 60})
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        sid = await _create(http, seed=3)
        assert (await http.get(f"/v1/sessions/{sid}")).status == 200  # a kept-alive connection
        await asyncio.wait_for(server.stop(), 30)  # the calls had ended: no 60 s wait

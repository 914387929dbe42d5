"""Exactly-once over a real channel: `expected_position` + `request_id`. A matching position
applies; a retry of the session's last request gets the original reply and applies nothing;
anything else is FAILED_PRECONDITION with a google.rpc.ErrorInfo carrying the position. A
retried Generate continues the same generation; Create and Fork retries return what the first
call made."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import code_value, item, read_replies, tokens


async def _create(client: SeqServeClient, **fields: object) -> str:
    request = pb.CreateSessionRequest(model="tok", **fields)  # type: ignore[arg-type]
    return (await client.sessions.CreateSession(request)).session.session_id


def _step(sid: str, rid: str, expected: int | None, *ids: int) -> pb.StepRequest:
    request = pb.StepRequest(session_id=sid, request_id=rid, input=tokens(*ids))
    if expected is not None:
        request.expected_position = expected
    return request


def _position_in(status: status_pb2.Status) -> int:
    """The session's position from the ErrorInfo detail (what clients read, not the text)."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason == "POSITION_MISMATCH":
            assert info.domain == "seqserve.v1"
            return int(info.metadata["position"])
    raise AssertionError(f"no POSITION_MISMATCH ErrorInfo in {status}")


async def _position(client: SeqServeClient, sid: str) -> int:
    return (await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))).session.position


async def test_a_retried_step_gets_its_original_reply_and_applies_nothing(
    client: SeqServeClient,
) -> None:
    sid = await _create(client)
    first = await client.sessions.Step(_step(sid, "a", 0, 1, 2, 3))
    assert first.position == 3
    again = await client.sessions.Step(_step(sid, "a", 0, 1, 2, 3))
    assert again == first  # the same reply, byte for byte
    assert await _position(client, sid) == 3
    nxt = await client.sessions.Step(_step(sid, "b", 3, 4))
    assert nxt.position == 4


@pytest.mark.parametrize(
    ("rid", "expected"),
    [("other", 0), ("a", 1), ("", 0)],
    ids=["other-id", "wrong-position", "no-id"],
)
async def test_anything_but_the_position_or_a_retry_is_failed_precondition_with_the_position(
    client: SeqServeClient, rid: str, expected: int
) -> None:
    sid = await _create(client)
    await client.sessions.Step(_step(sid, "a", 0, 1, 2, 3))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.sessions.Step(_step(sid, rid, expected, 9))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(err.value)
    assert status is not None and _position_in(status) == 3
    assert await _position(client, sid) == 3


async def test_stream_items_use_the_same_rules_inband(client: SeqServeClient) -> None:
    sid = await _create(client)
    call = client.sessions.Stream()
    ok = item(sid, "s1", tokens(1))
    ok.expected_position = 0
    await call.write(pb.StreamRequest(items=[ok]))
    first = (await read_replies(call, ["s1"]))["s1"][0]
    retry, wrong = item(sid, "s1", tokens(1)), item(sid, "s2", tokens(2))
    retry.expected_position, wrong.expected_position = 0, 5
    await call.write(pb.StreamRequest(items=[retry, wrong]))
    replies = await read_replies(call, ["s1", "s2"])
    await call.done_writing()
    assert replies["s1"][0] == first
    refused = replies["s2"][0]
    assert refused.error.code == code_value(grpc.StatusCode.FAILED_PRECONDITION)
    assert _position_in(refused.error) == 1


async def test_a_retried_generate_resends_its_tokens_and_continues_the_same_generation(
    client: SeqServeClient,
) -> None:
    sid, twin = await _create(client, seed=11), await _create(client, seed=11)
    sampling = make_sampling(temperature=1.0, max_tokens=12)
    request = pb.GenerateRequest(
        session_id=sid, request_id="g", expected_position=0, prompt=tokens(5), sampling=sampling
    )
    call = client.sessions.Generate(request)
    got: list[types.GeneratedToken] = []
    async for reply in call:  # the client goes away after 4 tokens
        got.append(reply.token)
        if len(got) == 4:
            call.cancel()
            break
    applied = await _position(client, sid)
    assert 1 + 4 <= applied <= 1 + 12  # the prompt and the tokens applied before the cancel
    retried = [r async for r in client.sessions.Generate(request)]
    assert [r.token.id for r in retried[:4]] == [t.id for t in got]
    assert retried[-1].token.finish_reason == types.FINISH_REASON_MAX_TOKENS
    assert [r.position for r in retried] == list(range(2, 14))
    uninterrupted = [
        r.token.id
        async for r in client.sessions.Generate(
            pb.GenerateRequest(session_id=twin, prompt=tokens(5), sampling=sampling)
        )
    ]
    assert [r.token.id for r in retried] == uninterrupted  # same tokens, same random stream
    assert await _position(client, sid) == 13


async def test_create_and_fork_retries_return_what_the_first_call_made(
    client: SeqServeClient,
) -> None:
    first = await client.sessions.CreateSession(
        pb.CreateSessionRequest(model="tok", request_id="c1", prefix=tokens(1, 2))
    )
    again = await client.sessions.CreateSession(
        pb.CreateSessionRequest(model="tok", request_id="c1", prefix=tokens(1, 2))
    )
    assert again.session.session_id == first.session.session_id
    assert again.prediction == first.prediction and again.session.position == 2
    sid = first.session.session_id
    fork = await client.sessions.ForkSession(pb.ForkSessionRequest(session_id=sid, request_id="f"))
    fork_again = await client.sessions.ForkSession(
        pb.ForkSessionRequest(session_id=sid, request_id="f")
    )
    assert fork_again.session.session_id == fork.session.session_id
    other = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
    assert other.session.session_id != sid


async def test_a_request_id_too_long_to_remember_is_invalid_argument(
    client: SeqServeClient,
) -> None:
    sid = await _create(client)
    long_id = "é" * 65  # 130 bytes
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.sessions.Step(_step(sid, long_id, 0, 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in (err.value.details() or "")
    assert await _position(client, sid) == 0
    assert (await client.sessions.Step(_step(sid, "x" * 128, 0, 1))).position == 1

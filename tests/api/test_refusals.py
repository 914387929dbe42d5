"""A refused request changes nothing: position, state and random stream stay where they were,
so the session's next prediction (and its next sampled tokens) are those of a session that
never saw the refused request. Each refusal path over a real channel."""

from __future__ import annotations

from pathlib import Path

import grpc

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .conftest import ServerFactory
from .support import (
    ReferenceSession,
    assert_matches_reference,
    code_value,
    expect_status,
    item,
    read_replies,
    tokens,
)

BIG_CHUNK = [(i * 7) % 256 for i in range(4096)]


async def _create(client: SeqServeClient, **fields: object) -> str:
    request = pb.CreateSessionRequest(model="tok", **fields)  # type: ignore[arg-type]
    return (await client.sessions.CreateSession(request)).session.session_id


async def _step(client: SeqServeClient, sid: str, *ids: int) -> pb.StepResponse:
    return await client.sessions.Step(pb.StepRequest(session_id=sid, input=tokens(*ids)))


async def _untouched(client: SeqServeClient, store_root: Path, sid: str, history: list[int]):  # type: ignore[no-untyped-def]
    """The session is at len(history) and predicts what the reference does after it."""
    reference = ReferenceSession(store_root, "tok")
    if history:
        reference.feed(history)
    reply = await _step(client, sid, 42)
    assert reply.position == len(history) + 1
    assert_matches_reference(reply.prediction, reference.feed([42])[-1])


async def test_a_step_whose_reply_could_not_be_sent_is_refused_before_it_runs(
    client: SeqServeClient, store_root: Path
) -> None:
    sid = await _create(client)
    await _step(client, sid, 1, 2, 3)
    request = pb.StepRequest(
        session_id=sid,
        input=tokens(*BIG_CHUNK),
        options=types.PredictionOptions(top_k=256, per_position=True),
    )
    await expect_status(
        client.sessions.Step(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SEQSERVE_SERVER__MAX_MESSAGE_BYTES",
    )
    await _untouched(client, store_root, sid, [1, 2, 3])


async def test_an_oversized_reply_in_a_stream_is_refused_inband_and_changes_nothing(
    client: SeqServeClient, store_root: Path
) -> None:
    sid, other = await _create(client), await _create(client)
    call = client.sessions.Stream()
    await call.write(
        pb.StreamRequest(
            items=[
                item(sid, "big", tokens(*BIG_CHUNK), top_k=256, per_position=True),
                item(other, "small", tokens(5)),
            ]
        )
    )
    replies = await read_replies(call, ["big", "small"])
    await call.done_writing()
    assert replies["big"][0].error.code == code_value(grpc.StatusCode.INVALID_ARGUMENT)
    assert replies["small"][0].position == 1
    await _untouched(client, store_root, sid, [])


async def test_a_generate_with_bad_sampling_consumes_neither_prompt_nor_randomness(
    client: SeqServeClient, store_root: Path
) -> None:
    sid, twin = await _create(client, seed=5), await _create(client, seed=5)
    bad = pb.GenerateRequest(
        session_id=sid, prompt=tokens(1, 2), sampling=make_sampling(top_p=0.0, max_tokens=4)
    )
    await expect_status(
        _drain(client.sessions.Generate(bad)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"
    )
    good = make_sampling(temperature=1.0, max_tokens=6)
    got = [r.token.id async for r in client.sessions.Generate(_gen(sid, good))]
    want = [r.token.id async for r in client.sessions.Generate(_gen(twin, good))]
    assert got == want  # same position, same state, same random stream as the untouched twin


async def test_a_create_whose_prefix_is_refused_leaves_no_session(
    client: SeqServeClient, server: SeqServeServer
) -> None:
    request = pb.CreateSessionRequest(
        model="tok",
        prefix=tokens(*BIG_CHUNK),
        options=types.PredictionOptions(top_k=256, per_position=True),
    )
    await expect_status(client.sessions.CreateSession(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert list(server.engine.sessions) == []


async def test_replies_ready_together_are_split_to_fit_the_message_limit(
    server_factory: ServerFactory,
) -> None:
    limit = 64 * 1024
    server = await server_factory(server={"max_message_bytes": limit})
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        sids = [await _create(client) for _ in range(40)]
        call = client.sessions.Stream()
        chunk = tokens(*range(1, 11))  # ten positions, 30 entries each: ~5 KB a reply
        items = [item(s, f"r{i}", chunk, top_k=30, per_position=True) for i, s in enumerate(sids)]
        await call.write(pb.StreamRequest(items=items))
        sizes: list[int] = []
        got: set[str] = set()
        while len(got) < len(sids):
            message = await call.read()
            assert message is not grpc.aio.EOF
            sizes.append(message.ByteSize())
            for reply in message.replies:
                assert reply.error.code == 0, reply.error.message
                assert len(reply.per_position) == 10
                got.add(reply.request_id)
        await call.done_writing()
    assert sum(sizes) > limit and max(sizes) <= limit


def _gen(sid: str, sampling: types.Sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(session_id=sid, sampling=sampling)


async def _drain(call) -> None:  # type: ignore[no-untyped-def]
    async for _ in call:
        pass

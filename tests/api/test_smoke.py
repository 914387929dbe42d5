"""End-to-end over loopback gRPC: the paths a client app takes first."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import ReferenceSession, softmax


async def test_feed_then_generate_reproducibly(client: SeqServeClient, store_root: Path) -> None:
    a = await client.create_session("tok", seed=11)
    pred = await a.feed(text="hello")
    assert pred.position == 5
    # The default top 5: the five most likely next bytes of the reference, with its probabilities.
    probs = softmax(ReferenceSession(store_root, "tok").feed(list(b"hello"))[-1])
    ids, served = [i for i, _, _ in pred.top], [p for _, p, _ in pred.top]
    assert len(ids) == len(set(ids)) == 5
    assert served == sorted(served, reverse=True)
    np.testing.assert_allclose(served, probs[ids], rtol=1e-5, atol=0)
    assert float(probs[ids].min()) >= float(np.delete(probs, ids).max()) - 1e-6
    pieces = [p async for p in a.generate(max_tokens=7, temperature=1.0)]
    assert [p.position for p in pieces] == list(range(6, 13))
    assert pieces[-1].finish_reason == "max_tokens"

    b = await client.create_session("tok", seed=11)
    await b.feed(text="hello")
    again = [p async for p in b.generate(max_tokens=7, temperature=1.0)]
    assert [p.token_id for p in again] == [p.token_id for p in pieces]


async def test_stream_multiplexes_sessions_with_inband_error(client: SeqServeClient) -> None:
    s1 = await client.create_session("tok")
    s2 = await client.create_session("tok")
    call = client.sessions.Stream()
    await call.write(
        pb.StreamRequest(
            items=[
                pb.StreamItem(session_id=s1.session_id, request_id="a",
                              input=types.Input(tokens=types.Tokens(ids=[1, 2]))),
                pb.StreamItem(session_id=s2.session_id, request_id="b",
                              input=types.Input(tokens=types.Tokens(ids=[999]))),
                pb.StreamItem(session_id="s_nope", request_id="c",
                              input=types.Input(text="x")),
            ]
        )
    )  # fmt: skip
    await call.done_writing()
    replies = {r.request_id: r async for msg in call for r in msg.replies}
    assert replies["a"].position == 2 and replies["a"].error.code == 0
    assert replies["b"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies["c"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    info = await s2.refresh()
    assert info.position == 0  # the bad item touched nothing


async def test_unknown_model_is_not_found(client: SeqServeClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.create_session("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tok" in (err.value.details() or "")

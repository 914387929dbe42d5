"""A live seqserve's Stream items and their in-band errors, counted over real gRPC: a Stream whose
items fail is still one OK call, so its items are counted apart (`seqserve_stream_items_total`,
`seqserve_stream_item_errors_total{code,reason}`), through each path an item's error takes: the
one-session path, the multiplexer's groups, a message refused whole."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from api.conftest import ServerFactory
from api.support import item, read_replies, tokens

from service.api import reply_wire
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.security.tokens import add_token

from .exposition import scrape

ERRORS = "seqserve_stream_item_errors_total"


async def test_in_band_item_errors_counted_by_code_and_reason(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens"
    alice = add_token(token_file, "alice", "client")
    server = await server_factory(
        server={"metrics_host": "127.0.0.1", "metrics_port": 0},
        # 4 input tokens a second, a bucket of 4: see item "2" below.
        security={"auth_tokens": token_file, "tokens_per_second": 4},
        max_items_per_message=4,
    )
    as_alice = (("authorization", f"Bearer {alice}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        a, b = [
            (
                await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=as_alice)
            ).session.session_id
            for _ in range(2)
        ]
        call = stub.Stream(metadata=as_alice)
        # Item "2" is refused for a bucket that is not full (a full one lets through an item
        # larger than itself): "1" leaves it 16 tokens below empty, full again after 5 s.
        # (When "1" was one token, the bucket was full 0.25 s later.) "3" and "4" come first:
        # charged after "1", they would be refused for the quota too.
        sent = [
            [item("s_no-such-session", "3", tokens(7)), item(b, "4", tokens(10**6))],
            [item(b, str(k), tokens(7)) for k in range(5, 10)],  # 5 items: over the limit
            [item(a, "1", tokens(*[7] * 20))],  # fed (the one-session path): 5 s' worth
            [item(a, "2", tokens(1, 2, 3, 4, 5))],  # over the quota: RESOURCE_EXHAUSTED
        ]
        got: list[pb.StreamReply] = []
        for items in sent:  # a message's replies read before the next is sent: in this order
            await call.write(pb.StreamRequest(items=items))
            wanted = len(got) + len(items)
            while len(got) < wanted:
                got.extend((await call.read()).replies)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    codes = {r.request_id: grpc.StatusCode(_code(r.error.code)).name for r in got if r.error.code}
    assert codes == {
        "2": "RESOURCE_EXHAUSTED", "3": "NOT_FOUND", "4": "INVALID_ARGUMENT",
        **{str(k): "INVALID_ARGUMENT" for k in range(5, 10)},
    }  # fmt: skip

    after = await scrape(server.metrics_port)
    assert after.types["seqserve_stream_items"] == "counter"
    assert after.total("seqserve_stream_items_total") == 9
    assert after.total(ERRORS, code="RESOURCE_EXHAUSTED", reason="QUOTA_EXCEEDED") == 1
    assert after.total(ERRORS, code="NOT_FOUND", reason="") == 1
    assert after.total(ERRORS, code="INVALID_ARGUMENT", reason="") == 6
    assert after.total(ERRORS) == 8
    # The call itself: one Stream, OK, and no refusal among the calls.
    stream = after.total("seqserve_rpc_duration_seconds_count", method="Stream")
    assert stream == after.total("seqserve_rpc_duration_seconds_count", method="Stream", code="OK")
    assert stream == 1
    assert after.total("seqserve_refusals_total") == 0


def _code(value: int) -> tuple[int, str]:
    """grpc.StatusCode's value for a google.rpc code number."""
    return next(c.value for c in grpc.StatusCode if c.value[0] == value)


async def test_a_message_whose_replies_cannot_be_built_counts_each_item_once(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's errors are counted once its response is built: if building it fails, every
    item is answered INTERNAL and counted so, not counted again on top of its own error (found
    by a review: errors outnumbered items, so the alert's ratio could pass 1). The failure is
    a stand-in: the feed replies' wire bytes broken."""
    server = await server_factory(server={"metrics_host": "127.0.0.1", "metrics_port": 0})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model="tok"))).session.session_id
        monkeypatch.setattr(reply_wire, "feed_reply", lambda *_: b"\x0a\x05\x01")  # truncated
        call = stub.Stream()
        both = [item("s_no-such-session", "a", tokens(7)), item(sid, "b", tokens(7))]
        await call.write(pb.StreamRequest(items=both))
        replies = await read_replies(call, ["a", "b"])
        await call.done_writing()
    assert {rid: got[0].error.code for rid, got in replies.items()} == {
        "a": grpc.StatusCode.INTERNAL.value[0], "b": grpc.StatusCode.INTERNAL.value[0],
    }  # fmt: skip
    after = await scrape(server.metrics_port)
    assert after.total("seqserve_stream_items_total") == 2
    assert after.total(ERRORS) == after.total(ERRORS, code="INTERNAL") == 2

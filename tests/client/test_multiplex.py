"""The multiplexing client over real gRPC: feeds awaited concurrently on one client go out as
Stream messages and come back exact, each with its own result or its own error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from tests.api.conftest import server, server_factory, store_root  # noqa: F401 - fixtures
from tests.api.support import ReferenceSession, assert_matches_reference, tokens


async def test_concurrent_feeds_go_out_together_and_come_back_exact(
    server: SeqServeServer,  # noqa: F811
    store_root: Path,  # noqa: F811
) -> None:
    async with SeqServeClient(f"127.0.0.1:{server.port}", multiplex=True, route_key="app") as c:
        sessions = [await c.create_session("tok", seed=i) for i in range(32)]
        chunks = [[(i * 7 + k) % 256 for k in range(1 + i % 3)] for i in range(32)]
        got = await asyncio.gather(
            *(s.feed(tokens=chunk, top_k=3) for s, chunk in zip(sessions, chunks, strict=True))
        )
        for session, chunk, prediction in zip(sessions, chunks, got, strict=True):
            assert prediction.position == len(chunk) == session.position
        step = await c.sessions.Step(  # one more, as a Step, to compare with the reference
            pb.StepRequest(session_id=sessions[5].session_id, input=tokens(9))
        )
        reference = ReferenceSession(store_root, "tok")
        reference.feed(chunks[5])
        assert_matches_reference(step.prediction, reference.feed([9])[-1])
        with pytest.raises(grpc.aio.AioRpcError) as err:  # an item's own error, as for Step
            await sessions[0].feed(tokens=[999])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for _ in range(100):  # a Stream is counted when it ends, just after the client closes it
        text = server.metrics.render().decode()
        if 'method="Stream"' in text:
            break
        await asyncio.sleep(0.02)
    assert 'method="Stream"' in text  # the feeds went as Stream items
    steps = [
        line
        for line in text.splitlines()
        if line.startswith("seqserve_rpc_duration_seconds_count") and 'method="Step"' in line
    ]
    assert steps == [
        'seqserve_rpc_duration_seconds_count{code="OK",method="Step",protocol="grpc"} 1.0'
    ]

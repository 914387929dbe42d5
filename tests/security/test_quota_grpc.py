"""Over real gRPC with auth on: a client that cancels a generation (a Generate call, a Stream's
generation item) after its first token pays for its prompt and the tokens generated, not for
the max_tokens it asked for. What it kept shows as the tokens a one-token step is then told are
still owed (its delay times the rate). At an eighth of a token a second, the bounds hold
through 8 s of refill between the charge and that step, 16 s unless a step ended after the
charge was settled: the wait for the generation to stop is in there, and a loaded host may
stall for seconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from service.client.client import SeqServeClient
from service.client.credentials import Credentials
from service.client.errors import QuotaExceededError
from service.client.results import Prediction
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.security.tokens import add_token
from tests.api.conftest import ServerFactory, server_factory, store_root  # noqa: F401 - fixtures

PROMPT = types.Input(tokens=types.Tokens(ids=[1, 2]))
SAMPLING = types.Sampling(temperature=0.0, max_tokens=500)  # charged 2 + 500
TOKENS_PER_SECOND = 0.125  # a bucket of an eighth of a token


def _retry_delay(err: grpc.aio.AioRpcError) -> float:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo detail")


async def _cancel_after_first_token(
    stub: pb_grpc.SessionServiceStub, session_id: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    call = stub.Generate(
        pb.GenerateRequest(session_id=session_id, prompt=PROMPT, sampling=SAMPLING),
        metadata=metadata,
    )
    await call.read()
    call.cancel()


async def _cancel_stream_after_first_token(
    stub: pb_grpc.SessionServiceStub, session_id: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    item = pb.StreamItem(
        session_id=session_id, input=PROMPT, generate=types.GenerateSpec(sampling=SAMPLING)
    )

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(items=[item])
        await asyncio.Event().wait()  # the stream stays open until cancelled

    call = stub.Stream(requests(), metadata=metadata)
    await call.read()
    call.cancel()


@pytest.mark.parametrize("cancel", [_cancel_after_first_token, _cancel_stream_after_first_token])
async def test_a_cancelled_generation_keeps_only_what_it_used(
    server_factory: ServerFactory,  # noqa: F811 - the fixture
    tmp_path: Path,
    cancel,  # type: ignore[no-untyped-def]
) -> None:
    tokens_file = tmp_path / "tokens"
    alice = (("authorization", f"Bearer {add_token(tokens_file, 'alice', 'client')}"),)
    security = {"auth_tokens": tokens_file, "tokens_per_second": TOKENS_PER_SECOND}
    server = await server_factory(security=security)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        create = pb.CreateSessionRequest(model="tok")
        sid = (await stub.CreateSession(create, metadata=alice)).session.session_id
        await cancel(stub, sid, alice)
        position = -1
        for _ in range(100):  # until the cancelled generation has stopped
            await asyncio.sleep(0.05)
            got = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=alice)
            if got.session.position == position:
                break
            position = got.session.position
        kept = position  # the prompt's 2 and each token generated, one position each
        assert 2 < kept < 502
        with pytest.raises(grpc.aio.AioRpcError) as err:
            step = pb.StepRequest(session_id=sid, input=types.Input(tokens=types.Tokens(ids=[1])))
            await stub.Step(step, metadata=alice)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        owed = _retry_delay(err.value) * TOKENS_PER_SECOND
        assert kept - 2.0 < owed <= kept + 0.01


async def test_concurrent_feeds_of_a_multiplexing_client_are_held_to_the_rate(
    server_factory: ServerFactory,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """The Python client sends concurrent feeds of many sessions as one Stream message: 16
    feeds of 50 tokens against a bucket of 5 a second. The first goes through (a full bucket
    lets one request larger than itself through, into a debt of 10 s), the other 15 are
    refused with RetryInfo and change nothing; it let all 800 tokens through in one message
    before."""
    tokens_file = tmp_path / "tokens"
    credentials = Credentials(token=add_token(tokens_file, "alice", "client"), insecure=True)
    server = await server_factory(security={"auth_tokens": tokens_file, "tokens_per_second": 5})
    async with SeqServeClient(f"127.0.0.1:{server.port}", credentials=credentials) as client:
        sessions = [await client.create_session("tok") for _ in range(16)]
        outcomes = await asyncio.gather(
            *(s.feed(tokens=[1] * 50) for s in sessions), return_exceptions=True
        )
        fed = [o for o in outcomes if isinstance(o, Prediction)]
        refused = [o for o in outcomes if isinstance(o, QuotaExceededError)]
        assert (len(fed), len(refused)) == (1, 15), outcomes
        positions = [
            (
                await client.sessions.GetSession(pb.GetSessionRequest(session_id=s.session_id))
            ).session.position
            for s in sessions
        ]
    assert sorted(positions) == [0] * 15 + [50]

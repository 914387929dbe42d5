"""A live seqserve's RESOURCE_EXHAUSTED calls, counted by reason over real gRPC and HTTP: one
principal over its own quota (QUOTA_EXCEEDED) apart from the server out of capacity
(SESSION_LIMIT), which is what lets SeqserveHighErrorRatio page for the second only."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc
import pytest
from api.conftest import ServerFactory
from google.rpc import error_details_pb2, status_pb2

from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.security.tokens import add_token

from .exposition import scrape

Metadata = tuple[tuple[str, str], ...]

# Two live sessions a principal, three a server: alice's third is over her quota while the
# server has room; bob's second finds the server full while he is within his.
LIMITS = {"security": {"sessions_per_principal": 2}, "sessions": {"max_sessions": 3}}


def _reason(err: grpc.aio.AioRpcError) -> str:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo detail")


async def _refused_over_grpc(stub: pb_grpc.SessionServiceStub, metadata: Metadata) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return _reason(err.value)


async def _refused_over_http(http: aiohttp.ClientSession, token: str) -> str:
    headers = {"authorization": f"Bearer {token}"}
    async with http.post("/v1/sessions", json={"model": "tok"}, headers=headers) as answer:
        error = (await answer.json())["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED"
    (reason,) = [d["reason"] for d in error["details"] if "reason" in d]
    return str(reason)


async def test_quota_and_capacity_refusals_are_counted_apart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    alice, bob = (add_token(tokens, name, "client") for name in ("alice", "bob"))
    server = await server_factory(
        server={"http_port": 0, "metrics_host": "127.0.0.1", "metrics_port": 0},
        security={"auth_tokens": tokens, **LIMITS["security"]},
        sessions=LIMITS["sessions"],
    )
    as_alice: Metadata = (("authorization", f"Bearer {alice}"),)
    as_bob: Metadata = (("authorization", f"Bearer {bob}"),)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
    ):
        stub = pb_grpc.SessionServiceStub(channel)
        for who in (as_alice, as_alice, as_bob):
            await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=who)
        refused = [
            await _refused_over_grpc(stub, as_alice),
            await _refused_over_http(http, alice),
            await _refused_over_grpc(stub, as_bob),
            await _refused_over_http(http, bob),
        ]
    after = await scrape(server.metrics_port)

    assert refused == ["QUOTA_EXCEEDED"] * 2 + ["SESSION_LIMIT"] * 2
    refusals = "seqserve_refusals_total"
    assert after.total(refusals, reason="QUOTA_EXCEEDED") == 2
    assert after.total(refusals, reason="SESSION_LIMIT") == 2
    assert after.total(refusals) == 4  # nothing under another reason, OTHER included
    exhausted = after.total("seqserve_rpc_duration_seconds_count", code="RESOURCE_EXHAUSTED")
    # What the error-ratio alert counts: every RESOURCE_EXHAUSTED but the quota ones.
    assert exhausted - after.total(refusals, reason="QUOTA_EXCEEDED") == 2

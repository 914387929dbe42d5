"""The client's exceptions: one class per reason of the server's error table, decoded from real
statuses of a real server over loopback (unary calls, generations, multiplexed Stream items);
no bare `grpc.aio.AioRpcError` leaves a client method."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from service import errors as server_errors
from service.api.server import SeqServeServer
from service.client import errors
from service.client.client import SeqServeClient
from service.client.credentials import Credentials
from service.client.retry import RetryPolicy
from service.security.tokens import add_token
from tests.api.conftest import (  # noqa: F401 - fixtures
    ServerFactory,
    server,
    server_factory,
    store_root,
)


def test_one_client_class_per_server_reason() -> None:
    """Every reason the server can send has its own class, under its status's class."""
    assert set(errors.REASON_CLASSES) == set(server_errors.REASONS)
    assert len(set(errors.REASON_CLASSES.values())) == len(errors.REASON_CLASSES)
    for reason, cls in errors.REASON_CLASSES.items():
        code = server_errors.REASONS[reason]
        assert cls.status_code == code, reason
        assert issubclass(cls, errors.CODE_CLASSES[code]) and issubclass(cls, errors.SeqServeError)


def _status(code: grpc.StatusCode, message: str, *details: object) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)  # type: ignore[arg-type]
        status.details.append(packed)
    return status


def test_decoding_reason_metadata_and_retry_delay() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="QUOTA_EXCEEDED", domain="seqserve.v1", metadata={"k": "v"}
    )
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=250_000_000))
    err = errors.error_from_status(
        _status(grpc.StatusCode.RESOURCE_EXHAUSTED, "over quota", info, retry)
    )
    assert type(err) is errors.QuotaExceededError
    assert (err.code(), err.reason, err.message, err.metadata) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED", "over quota", {"k": "v"}
    )  # fmt: skip
    assert err.retry_delay == 0.25 and err.status_details == [info, retry]
    assert str(err) == "RESOURCE_EXHAUSTED (QUOTA_EXCEEDED): over quota"
    # A reason this client does not know, another domain's, or none: the code's class.
    unknown = error_details_pb2.ErrorInfo(reason="NEW_IN_V2", domain="seqserve.v1")
    assert type(errors.error_from_status(_status(grpc.StatusCode.NOT_FOUND, "x", unknown))) is (
        errors.NotFoundError
    )
    other = error_details_pb2.ErrorInfo(reason="SESSION_CLOSED", domain="example.com")
    got = errors.error_from_status(_status(grpc.StatusCode.FAILED_PRECONDITION, "x", other))
    assert type(got) is errors.FailedPreconditionError and got.reason == ""
    assert type(errors.error_from_status(_status(grpc.StatusCode.UNKNOWN, "?"))) is (
        errors.SeqServeError
    )


async def _raises(awaitable: object, cls: type[errors.SeqServeError]) -> errors.SeqServeError:
    with pytest.raises(errors.SeqServeError) as caught:
        await awaitable  # type: ignore[misc]
    assert type(caught.value) is cls, repr(caught.value)
    assert type(caught.value) is not grpc.aio.AioRpcError
    return caught.value


async def test_real_statuses_raise_their_reasons_class(server: SeqServeServer) -> None:  # noqa: F811
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        err = await _raises(client.create_session("nope"), errors.ModelNotFoundError)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "tok" in err.message
        await _raises(client.create_session("tok", "9"), errors.VersionNotFoundError)
        await _raises(client.create_session("tok", "canary"), errors.AliasNotFoundError)
        await _raises(client.get_model("nope"), errors.ModelNotFoundError)
        await _raises(client.attach("s_gone.none"), errors.SessionNotFoundError)

        session = await client.create_session("tok", seed=1)
        bad = await _raises(session.feed(tokens=[256]), errors.InvalidArgumentError)
        assert bad.reason == "INVALID_ARGUMENT" and "256" in bad.message
        # Another handle fed the session: this one's expected position is stale.
        other = await client.attach(session.session_id)
        await other.feed(text="ab")
        stale = await _raises(session.feed(text="c"), errors.PositionMismatchError)
        assert isinstance(stale, errors.PositionMismatchError) and stale.position == 2
        assert session.position == 2  # the handle took the server's position: it goes on
        assert (await session.feed(text="c")).position == 3
        gen = session.generate(max_tokens=3, top_p=5.0)
        await _raises(anext(gen), errors.InvalidArgumentError)

        await session.close()
        await _raises(other.feed(text="d"), errors.SessionClosedError)
        await _raises(other.refresh(), errors.SessionClosedError)


async def test_multiplexed_feed_errors_are_the_same_classes(server: SeqServeServer) -> None:  # noqa: F811
    async with SeqServeClient(f"127.0.0.1:{server.port}", multiplex=True) as client:
        session = await client.create_session("tok")
        err = await _raises(session.feed(tokens=[999]), errors.InvalidArgumentError)
        assert "999" in err.message
        assert (await session.feed(tokens=[1, 2])).position == 2


async def test_draining_server_raises_draining_error(server: SeqServeServer) -> None:  # noqa: F811
    retry = RetryPolicy(deadline_seconds=0.3)
    async with SeqServeClient(f"127.0.0.1:{server.port}", retry=retry) as client:
        session = await client.create_session("tok")
        server.engine.begin_draining()
        # Retried (a feed is safe to repeat) until the retry deadline, then raised as such.
        err = await _raises(session.feed(text="a"), errors.DrainingError)
        assert isinstance(err, errors.UnavailableError) and "draining" in err.message


async def test_credentials_roles_and_quotas(
    server_factory: ServerFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    alice, root = add_token(tokens, "alice", "client"), add_token(tokens, "root", "admin")
    srv = await server_factory(security={"auth_tokens": tokens, "sessions_per_principal": 1})
    target = f"127.0.0.1:{srv.port}"
    async with SeqServeClient(target, credentials=Credentials(token="sqs_nobody")) as client:
        await _raises(client.list_models(), errors.UnauthenticatedError)
    async with SeqServeClient(target, credentials=Credentials(token=alice)) as client:
        await _raises(client.set_alias("tok", "canary", 1), errors.PermissionDeniedError)
        async with await client.create_session("tok"):
            over = await _raises(client.create_session("tok"), errors.QuotaExceededError)
            assert over.retry_delay is not None and over.retry_delay > 0
    async with SeqServeClient(target, credentials=Credentials(token=root)) as client:
        assert await client.set_alias("tok", "canary", 1) == {"canary": 1}
        assert await client.set_alias("tok", "canary", 1) == {"canary": 1}  # again: the same
        assert await client.delete_alias("tok", "canary") == {}
        await _raises(client.delete_alias("tok", "canary"), errors.AliasNotFoundError)

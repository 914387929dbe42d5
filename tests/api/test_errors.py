"""Every row of DESIGN section 4's error table, produced over a real channel, plus a check that
`service.errors.ERROR_TABLE` is that table."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2

from service import errors
from service.api.server import SeqServeServer
from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import model_registry_pb2 as reg
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.registry.store import ModelStore
from service.runtime.runner import ModelRunner
from tests.polling import until

from .conftest import TOKEN_CONFIG, ServerFactory, publish_random
from .support import (
    check_error_info,
    code_value,
    expect_status,
    expect_stream_status,
    frames,
    item,
    read_replies,
    text,
    tokens,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# ---- the table itself --------------------------------------------------------------------------

# DESIGN.md section 4, "Errors (one table in code, tested)", row by row: condition → status.
DESIGN_ERROR_TABLE = [
    ("bad token id, wrong frame size, bad sampling params, empty or oversized input",
     "INVALID_ARGUMENT"),
    ("unknown session, model, version or alias", "NOT_FOUND"),
    ("two concurrent requests on one session", "ABORTED"),
    ("session closed, version unloading", "FAILED_PRECONDITION"),
    ("over session / queue / memory limits", "RESOURCE_EXHAUSTED"),
    ("draining, model not ready", "UNAVAILABLE"),
    ("weights digest mismatch", "DATA_LOSS"),
    ("no or unknown credentials (DESIGN section 13)", "UNAUTHENTICATED"),
    ("a role that does not allow the call (DESIGN section 13)", "PERMISSION_DENIED"),
    ("anything else", "INTERNAL"),
]  # fmt: skip

# The class in service.errors that stands for each row.
ROW_CLASS = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "NOT_FOUND": errors.NotFound,
    "ABORTED": errors.Aborted,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    "UNAVAILABLE": errors.Unavailable,
    "DATA_LOSS": errors.DataLoss,
    "UNAUTHENTICATED": errors.Unauthenticated,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "INTERNAL": errors.Internal,
}


def test_error_table_is_designs_table() -> None:
    expected = {ROW_CLASS[code]: grpc.StatusCode[code] for _, code in DESIGN_ERROR_TABLE}
    assert expected == errors.ERROR_TABLE
    assert len({code for _, code in DESIGN_ERROR_TABLE}) == len(DESIGN_ERROR_TABLE)
    # Every error class the service can raise keeps the status of its row.
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.SeqServeError):
            if cls is errors.SeqServeError:
                continue
            row = next(base for base in errors.ERROR_TABLE if issubclass(cls, base))
            assert cls.status == errors.ERROR_TABLE[row], cls
    assert errors.DigestMismatch.status == grpc.StatusCode.DATA_LOSS
    assert issubclass(errors.ModelNotFound, errors.NotFound)
    assert issubclass(errors.VersionUnusable, errors.FailedPrecondition)


def _raised(exc: errors.SeqServeError) -> errors.SeqServeError:
    try:
        raise exc
    except errors.SeqServeError as caught:
        return caught


def test_an_error_kept_as_an_outcome_drops_its_traceback_unless_internal() -> None:
    """A refused item's error is kept until its reply is written; its traceback's frames would
    hold the list that keeps it (a reference cycle). An INTERNAL one keeps it for the log."""
    refused = _raised(errors.SessionNotFound("no such session"))
    assert refused.__traceback__ is not None
    assert refused.detached() is refused and refused.__traceback__ is None
    assert refused.message == "no such session" and refused.status == NOT_FOUND
    bug = _raised(errors.Internal("step failed"))
    assert bug.detached().__traceback__ is not None

    # The exceptions it chains lose theirs too, a context hidden by `from None` included.
    try:
        try:
            raise OSError(28, "no space")
        except OSError:
            raise errors.JournalUnavailable("not durable") from None
    except errors.JournalUnavailable as caught:
        chained = caught
    hidden = chained.__context__
    assert hidden is not None and hidden.__traceback__ is not None
    chained.detached()
    assert chained.__traceback__ is None and hidden.__traceback__ is None


# ---- helpers -------------------------------------------------------------------------------------


async def _create(client: SeqServeClient, model: str = "tok", **fields: object) -> str:
    request = pb.CreateSessionRequest(model=model, **fields)  # type: ignore[arg-type]
    return (await client.sessions.CreateSession(request)).session.session_id


def _create_call(client: SeqServeClient, model: str = "tok", **fields: object):  # type: ignore[no-untyped-def]
    return client.sessions.CreateSession(pb.CreateSessionRequest(model=model, **fields))  # type: ignore[arg-type]


def _step(client: SeqServeClient, sid: str, inp: types.Input | None, **options: object):  # type: ignore[no-untyped-def]
    request = pb.StepRequest(session_id=sid, options=types.PredictionOptions(**options))  # type: ignore[arg-type]
    if inp is not None:
        request.input.CopyFrom(inp)
    return client.sessions.Step(request)


def _generate(
    client: SeqServeClient,
    sid: str,
    sampling: types.Sampling | None = None,
    prompt: types.Input | None = None,
):  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(session_id=sid)
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    if prompt is not None:
        request.prompt.CopyFrom(prompt)
    return client.sessions.Generate(request)


async def _client_of(srv: SeqServeServer, **kwargs: int) -> SeqServeClient:
    return SeqServeClient(f"127.0.0.1:{srv.port}", **kwargs)


# ---- INVALID_ARGUMENT ----------------------------------------------------------------------


async def test_a_failed_unary_call_sends_its_status_and_no_message(
    client: SeqServeClient,
) -> None:
    """Read as a stream (as a proxy or a transcoder may read it), a refused Step sends nothing
    before its status. (A status set on the context and a normal return sent an empty
    message first.)"""
    raw = client.channel.unary_stream(
        "/seqserve.v1.SessionService/Step",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    request = pb.StepRequest(session_id="no-such-session", input=tokens(1))
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for message in raw(request.SerializeToString()):
            received.append(message)
    assert err.value.code() == NOT_FOUND and received == []


async def test_bad_token_ids(client: SeqServeClient) -> None:
    sid = await _create(client)
    await expect_status(
        _step(client, sid, tokens(1, 256)), INVALID, "256", "[0, 256)", reason="INVALID_ARGUMENT"
    )
    await expect_status(_step(client, sid, tokens(-1)), INVALID, "-1")
    await expect_status(
        client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", prefix=tokens(300))),
        INVALID, "300",
    )  # fmt: skip
    await expect_stream_status(_generate(client, sid, prompt=tokens(999)), INVALID, "999")
    info = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.session.position == 0  # nothing was consumed by the refused chunks


async def test_wrong_input_for_the_model(client: SeqServeClient) -> None:
    feats = await _create(client, model="frames")
    toks = await _create(client)
    await expect_status(
        _step(client, feats, frames([0.1, 0.2])), INVALID, "frame size 3", "2 values"
    )
    await expect_status(_step(client, feats, frames([0.1] * 7)), INVALID, "7 values")
    await expect_status(_step(client, feats, frames([0.1, math.nan, 0.3])), INVALID, "finite")
    # Finite, but it overflowed the first layer and left the state NaN for every later step.
    await expect_status(_step(client, feats, frames([3e38, 3e38, 3e38])), INVALID, "within")
    fine = await _step(client, feats, frames([400.0, 0.5, 0.5]))
    assert fine.position == 1 and all(math.isfinite(v) for v in fine.prediction.regression.values)
    await expect_status(_step(client, feats, text("abc")), INVALID, "frames")
    await expect_status(_step(client, toks, frames([0.1, 0.2, 0.3])), INVALID, "not frames")
    await expect_stream_status(_generate(client, feats), INVALID, "token model")


async def test_empty_inputs(client: SeqServeClient) -> None:
    sid = await _create(client)
    feats = await _create(client, model="frames")
    await expect_status(_step(client, sid, None), INVALID, "empty")
    await expect_status(_step(client, sid, types.Input(tokens=types.Tokens())), INVALID, "empty")
    await expect_status(_step(client, sid, text("")), INVALID, "empty")
    await expect_status(
        _step(client, feats, types.Input(frames=types.Frames())), INVALID, "non-empty"
    )


@pytest.mark.parametrize(
    ("sampling", "needle"),
    [
        (make_sampling(top_p=0.0), "top_p"),
        (make_sampling(top_p=1.5), "top_p"),
        (make_sampling(top_p=-0.1), "top_p"),
        (make_sampling(temperature=-1.0), "temperature"),
        (make_sampling(temperature=math.nan), "temperature"),
        (make_sampling(top_k=-2), "top_k"),
        (make_sampling(max_tokens=2049), "max_tokens"),
        (make_sampling(max_tokens=0), "max_tokens"),
        (make_sampling(stop_token_ids=[256]), "stop token"),
        (make_sampling(stop=[""]), "stop strings"),
    ],
)
async def test_bad_sampling_params(
    client: SeqServeClient, sampling: types.Sampling, needle: str
) -> None:
    sid = await _create(client)
    await expect_stream_status(_generate(client, sid, sampling), INVALID, needle)
    # The same params as a session's default are refused when the session is created.
    await expect_status(
        _create_call(client, default_sampling=sampling),
        INVALID, needle,
    )  # fmt: skip
    # And in a Stream generate item, in-band.
    call = client.sessions.Stream()
    await call.write(pb.StreamRequest(items=[item(sid, "g", generate=sampling)]))
    (reply,) = (await read_replies(call, ["g"]))["g"]
    await call.done_writing()
    assert reply.error.code == code_value(INVALID) and needle in reply.error.message
    # The session was not touched and is free for the next request.
    r = await _step(client, sid, text("ok"))
    assert r.position == 2


async def test_bad_prediction_options_and_ttl(client: SeqServeClient) -> None:
    sid = await _create(client)
    await expect_status(_step(client, sid, text("a"), top_k=-1), INVALID, "top_k")
    await expect_status(
        _create_call(client, ttl=Duration(seconds=-5)),
        INVALID, "ttl",
    )  # fmt: skip
    await expect_status(
        _create_call(client, ttl=Duration(seconds=10**6)),
        INVALID, "ttl",
    )  # fmt: skip


async def test_oversized_chunks(server_factory: ServerFactory) -> None:
    srv = await server_factory(max_chunk_tokens=8)
    async with await _client_of(srv) as client:
        sid = await _create(client)
        feats = await _create(client, model="frames")
        await expect_status(_step(client, sid, tokens(*range(9))), INVALID, "9 tokens", "8")
        await expect_status(_step(client, sid, text("123456789")), INVALID, "9 tokens")
        await expect_status(_step(client, feats, frames([0.0] * 27)), INVALID, "9 frames")
        await expect_status(
            _create_call(client, prefix=text("x" * 9)),
            INVALID, "exceeds",
        )  # fmt: skip
        await expect_stream_status(
            _generate(client, sid, prompt=text("y" * 20)), INVALID, "exceeds"
        )
        assert (await _step(client, sid, tokens(*range(8)))).position == 8  # at the cap is fine
        assert (await _step(client, feats, frames([0.0] * 24))).position == 8


async def test_message_over_max_message_bytes(server_factory: ServerFactory) -> None:
    """A request over `server.max_message_bytes` is refused by our code with INVALID_ARGUMENT,
    naming the limit and the setting; a stream message over it gets in-band errors and the
    stream goes on. Past twice the limit gRPC itself refuses it with RESOURCE_EXHAUSTED, before
    any handler runs."""
    srv = await server_factory(server={"max_message_bytes": 64 * 1024})
    async with await _client_of(srv) as client:
        sid = await _create(client)
        await expect_status(
            _step(client, sid, text("a" * 100_000)),
            grpc.StatusCode.INVALID_ARGUMENT, "MAX_MESSAGE_BYTES",
        )  # fmt: skip
        await expect_status(
            _step(client, sid, text("a" * 200_000)),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max", by_grpc=True,
        )  # fmt: skip
        assert (await _step(client, sid, text("a" * 1000))).position == 1000

        call = client.sessions.Stream()
        big = pb.StreamItem(session_id=sid, request_id="big", input=text("b" * 70_000))
        await call.write(pb.StreamRequest(items=[big]))
        await call.write(
            pb.StreamRequest(
                items=[pb.StreamItem(session_id=sid, request_id="ok", input=text("c"))]
            )
        )
        await call.done_writing()
        replies = {r.request_id: r async for message in call for r in message.replies}
        assert replies["big"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "MAX_MESSAGE_BYTES" in replies["big"].error.message
        assert replies["ok"].error.code == 0 and replies["ok"].position == 1001


# ---- NOT_FOUND -----------------------------------------------------------------------------------


async def test_unknown_session_model_version_alias(client: SeqServeClient) -> None:
    sid = "s_does_not_exist"
    session = "SESSION_NOT_FOUND"
    await expect_status(_step(client, sid, text("a")), NOT_FOUND, sid, reason=session)
    await expect_status(
        client.sessions.GetSession(pb.GetSessionRequest(session_id=sid)),
        NOT_FOUND, sid, reason=session,
    )  # fmt: skip
    await expect_status(
        client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid)),
        NOT_FOUND, reason=session,
    )  # fmt: skip
    await expect_status(
        client.sessions.ForkSession(pb.ForkSessionRequest(session_id=sid)),
        NOT_FOUND, reason=session,
    )  # fmt: skip
    await expect_stream_status(_generate(client, sid), NOT_FOUND, sid, reason=session)

    create = client.sessions.CreateSession
    await expect_status(
        create(pb.CreateSessionRequest(model="nope")),
        NOT_FOUND, "nope", "tok", reason="MODEL_NOT_FOUND",
    )  # fmt: skip
    await expect_status(
        create(pb.CreateSessionRequest(model="tok", version="7")),
        NOT_FOUND, "7", "versions: 1", reason="VERSION_NOT_FOUND",
    )  # fmt: skip
    await expect_status(
        create(pb.CreateSessionRequest(model="tok", version="staging")),
        NOT_FOUND, "staging", reason="ALIAS_NOT_FOUND",
    )  # fmt: skip
    await expect_status(
        client.registry.GetModel(reg.GetModelRequest(name="nope")),
        NOT_FOUND, "nope", reason="MODEL_NOT_FOUND",
    )  # fmt: skip
    await expect_status(
        client.registry.DeleteAlias(reg.DeleteAliasRequest(name="tok", alias="staging")),
        NOT_FOUND, "staging", reason="ALIAS_NOT_FOUND",
    )  # fmt: skip


# ---- ABORTED -------------------------------------------------------------------------------------


async def test_concurrent_requests_on_one_session_are_aborted(
    server_factory: ServerFactory,
) -> None:
    # A generation no host finishes before the last check: of a 2048-token one, some 30 tokens
    # (once 243) had run by then on a host doing 1,000 a second, and a faster one may do 5x.
    srv = await server_factory(max_generate_tokens=10_000_000)
    async with await _client_of(srv) as client:
        sid = await _create(client, seed=1)
        other = await _create(client)
        long_gen = _generate(client, sid, make_sampling(max_tokens=10_000_000))
        first = await long_gen.read()  # the generation is running
        assert first.token.finish_reason == types.FINISH_REASON_UNSPECIFIED
        try:
            aborted = grpc.StatusCode.ABORTED
            await expect_status(
                _step(client, sid, text("x")), aborted, sid, "in progress", reason="SESSION_BUSY"
            )
            await expect_status(
                client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid)), aborted
            )
            await expect_status(
                client.sessions.ForkSession(pb.ForkSessionRequest(session_id=sid)), aborted
            )
            await expect_stream_status(_generate(client, sid, make_sampling(max_tokens=1)), aborted)
            call = client.sessions.Stream()
            await call.write(
                pb.StreamRequest(
                    items=[item(sid, "busy", text("y")), item(other, "free", text("y"))]
                )
            )
            r = await read_replies(call, ["busy", "free"])
            await call.done_writing()
            assert r["busy"][0].error.code == code_value(aborted)
            assert check_error_info(r["busy"][0].error) == "SESSION_BUSY"  # in-band, the same
            assert r["free"][0].error.code == 0 and r["free"][0].position == 1
        finally:
            long_gen.cancel()


# ---- FAILED_PRECONDITION -------------------------------------------------------------------------


def _add_malformed_version(store_root: Path, version: int) -> None:
    """Version `version` of `tok`: v1's weights with a manifest carrying an unknown field."""
    src, dst = store_root / "tok" / "1", store_root / "tok" / str(version)
    dst.mkdir()
    (dst / "weights.safetensors").write_bytes((src / "weights.safetensors").read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    manifest.update(version=version, surprise_field=True)
    (dst / "manifest.json").write_text(json.dumps(manifest))


async def test_refused_version_is_failed_precondition(
    client: SeqServeClient, store_root: Path
) -> None:
    _add_malformed_version(store_root, 2)
    fp = grpc.StatusCode.FAILED_PRECONDITION
    await expect_status(
        client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", version="2")),
        fp, "surprise_field", reason="VERSION_UNAVAILABLE",
    )  # fmt: skip
    await expect_status(
        client.registry.SetAlias(reg.SetAliasRequest(name="tok", alias="production", version=2)),
        fp, "unusable",
    )  # fmt: skip
    # A broken newest version never becomes the default: new sessions still get version 1.
    s = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
    assert s.session.version == 1


async def test_malformed_aliases_file_is_failed_precondition(
    client: SeqServeClient, store_root: Path
) -> None:
    (store_root / "tok" / "aliases.json").write_text('{"production": "one"')
    await expect_status(
        client.sessions.CreateSession(pb.CreateSessionRequest(model="tok")),
        grpc.StatusCode.FAILED_PRECONDITION, "aliases.json", reason="VERSION_UNAVAILABLE",
    )  # fmt: skip
    # An explicit version does not need the aliases.
    s = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", version="1"))
    assert s.session.version == 1


# ---- RESOURCE_EXHAUSTED --------------------------------------------------------------------------


async def test_session_limit(server_factory: ServerFactory) -> None:
    srv = await server_factory(sessions={"max_sessions": 2})
    async with await _client_of(srv) as client:
        a = await _create(client)
        await _create(client, model="frames")
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        await expect_status(
            client.sessions.CreateSession(pb.CreateSessionRequest(model="tok")),
            exhausted, "limit", reason="SESSION_LIMIT",
        )  # fmt: skip
        await expect_status(
            client.sessions.ForkSession(pb.ForkSessionRequest(session_id=a)), exhausted, "limit"
        )
        await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=a))
        assert await _create(client)  # room again


# ---- UNAVAILABLE ---------------------------------------------------------------------------------


async def test_stop_drains_new_rpcs_and_stream_items(
    server_factory: ServerFactory,
) -> None:
    srv = await server_factory(server={"grace_seconds": 30.0})
    async with await _client_of(srv) as client:
        sid = await _create(client)
        call = client.sessions.Stream()
        await call.write(pb.StreamRequest(items=[item(sid, "before", text("ab"))]))
        assert (await read_replies(call, ["before"]))["before"][0].position == 2

        stopping = asyncio.create_task(srv.stop())

        async def refused() -> bool:
            try:
                await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    return True
                assert err.code() == grpc.StatusCode.CANCELLED, err
            return False

        # A new RPC is refused once the stop has begun (the listener is closed); one that
        # races the start of the shutdown may instead be cancelled by gRPC.
        await until(  # a loaded host may take seconds
            refused, 60, "the stopping server to refuse new RPCs", interval=0.005
        )
        assert not stopping.done()  # it waits for the open stream (grace is 30 s)
        # A stream already open may finish, but new work on it is refused in-band, so the
        # client moves its sessions elsewhere; the stream itself ends cleanly.
        await call.write(pb.StreamRequest(items=[item(sid, "after", text("c"))]))
        (reply,) = (await read_replies(call, ["after"]))["after"]
        assert reply.error.code == code_value(grpc.StatusCode.UNAVAILABLE)
        assert "draining" in reply.error.message
        assert check_error_info(reply.error) == "DRAINING"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await stopping
        assert srv.engine.draining


async def test_draining_engine_answers_unavailable(
    server: SeqServeServer, client: SeqServeClient
) -> None:
    """What a request racing the stop sees once the engine drains (before the listener closes)."""
    sid = await _create(client)
    server.engine.begin_draining()
    unavailable = grpc.StatusCode.UNAVAILABLE
    await expect_status(_step(client, sid, text("a")), unavailable, "draining", reason="DRAINING")
    await expect_status(
        client.sessions.CreateSession(pb.CreateSessionRequest(model="tok")), unavailable
    )
    await expect_status(
        client.sessions.ForkSession(pb.ForkSessionRequest(session_id=sid)), unavailable
    )
    await expect_stream_status(_generate(client, sid), unavailable, "draining")


# ---- DATA_LOSS -----------------------------------------------------------------------------------


async def test_weights_digest_mismatch_is_data_loss(
    client: SeqServeClient, store_root: Path
) -> None:
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=5)  # version 2
    weights = store_root / "tok" / "2" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data, after the header
    weights.write_bytes(bytes(data))
    for _ in range(2):  # refused every time, not just on the first load
        details = await expect_status(
            client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", version="2")),
            grpc.StatusCode.DATA_LOSS, "sha256", "tok/2/weights.safetensors",
            reason="DIGEST_MISMATCH",
        )  # fmt: skip
        assert str(store_root) not in details  # the file within the store, not the server's path
    # The rest keeps serving.
    ok = await client.sessions.CreateSession(
        pb.CreateSessionRequest(model="tok", version="1", prefix=text("a"))
    )
    assert ok.session.version == 1 and ok.prediction.tokens.top
    assert await _create(client, model="frames")


async def test_latest_with_a_bad_digest_is_skipped_for_the_next_older(
    client: SeqServeClient, store_root: Path
) -> None:
    """Like a malformed manifest, a tampered latest version is skipped when "" / "latest" mean
    the newest version; by number it is still refused, and GetModel says why."""
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=5)  # version 2
    weights = store_root / "tok" / "2" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    for spec in ("", "latest", ""):  # the second "" takes the remembered refusal
        made = await client.sessions.CreateSession(
            pb.CreateSessionRequest(model="tok", version=spec)
        )
        assert made.session.version == 1
    await expect_status(
        client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", version="2")),
        grpc.StatusCode.DATA_LOSS, "sha256",
    )  # fmt: skip
    detail = (await client.registry.GetModel(reg.GetModelRequest(name="tok"))).model
    status = {v.version: (v.status, v.status_reason) for v in detail.versions}
    assert status[1][0] == reg.VERSION_STATUS_OK
    assert status[2][0] == reg.VERSION_STATUS_REFUSED and "sha256" in status[2][1]
    # Repaired (republished bytes), it is served again.
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    made = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
    assert made.session.version == 2


# ---- INTERNAL ------------------------------------------------------------------------------------


@pytest.fixture
def broken_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: ModelRunner, batch: object) -> None:
        raise RuntimeError("secret detail at /srv/seqserve/runtime/runner.py line 42")

    monkeypatch.setattr(ModelRunner, "execute", explode)


def _assert_internal_message(message: str) -> None:
    assert "error id" in message
    assert "secret" not in message and "Traceback" not in message and "runner.py" not in message


async def test_unexpected_exception_is_internal_with_an_error_id(
    client: SeqServeClient, broken_runner: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = await _create(client)
    internal = grpc.StatusCode.INTERNAL
    _assert_internal_message(await expect_status(_step(client, sid, text("a")), internal))
    _assert_internal_message(
        await expect_stream_status(_generate(client, sid, make_sampling(max_tokens=3)), internal)
    )
    call = client.sessions.Stream()
    await call.write(pb.StreamRequest(items=[item(sid, "x", text("a"))]))
    (reply,) = (await read_replies(call, ["x"]))["x"]
    await call.done_writing()
    assert reply.error.code == code_value(internal)
    _assert_internal_message(reply.error.message)
    assert check_error_info(reply.error, "INTERNAL")
    info = error_details_pb2.ErrorInfo()
    assert reply.error.details[0].Unpack(info)
    assert f"(error id {info.metadata['error_id']})" in reply.error.message  # the one logged

    # The server survives the bug: once the runner works again, so does the session.
    monkeypatch.undo()
    assert (await _step(client, sid, text("b"))).position == 1


async def test_internal_error_ids_are_distinct(client: SeqServeClient, broken_runner: None) -> None:
    sid = await _create(client)
    first = await expect_status(_step(client, sid, text("a")), grpc.StatusCode.INTERNAL)
    second = await expect_status(_step(client, sid, text("a")), grpc.StatusCode.INTERNAL)
    assert first != second

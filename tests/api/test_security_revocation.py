"""Tokens revoked (or given another role) while a call is open, over real gRPC: an open Stream
or Generate ends with UNAUTHENTICATED, an idle one too (the revocation watch), and nothing the
stream sends afterwards is applied."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.security import revocation_watch
from service.security import tokens as tokens_module
from service.security.tokens import add_token
from tests.polling import until

from .conftest import ServerFactory
from .support import item, recorded_rpcs, tokens

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
MAX_TOKENS = 2048  # the most one generation may ask for: ended long before, if revoked


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens"
    made = {name: add_token(path, name, "client") for name in ("alice", "bob")}
    return path, made


@pytest.fixture
def reread_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check looks at the file (not at most once a second): no waiting in the test."""
    monkeypatch.setattr(tokens_module, "_CHECK_EVERY_S", 0.0)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _rewrite(path: Path, name: str, line: str | None) -> str:
    """`name`'s line replaced by `line` (None: removed), as an operator would, atomically;
    the text before, to put back."""
    before = path.read_text()
    lines = [
        (line if line is not None else "") if row.startswith(f"{name} ") else row
        for row in before.splitlines()
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(row for row in lines if row) + "\n")
    os.replace(tmp, path)
    return before


async def _until(accepted: bool, registry: reg_grpc.ModelRegistryStub, token: str) -> None:
    """Wait until a new call with `token` is accepted (or refused): the file was re-read."""

    async def answered() -> bool:
        try:
            await registry.ListModels(reg_pb.ListModelsRequest(), metadata=_bearer(token))
        except grpc.aio.AioRpcError as err:
            assert err.code() == UNAUTHENTICATED
            return not accepted
        return accepted

    # Re-read once a second; a loaded host may be late by seconds.
    await until(
        answered, 60, f"a new call to be {'accepted' if accepted else 'refused'}", interval=0.1
    )


async def _create(stub: pb_grpc.SessionServiceStub, token: str) -> str:
    made = await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=_bearer(token))
    return made.session.session_id


async def _feed(call: grpc.aio.StreamStreamCall, sid: str, rid: str) -> pb.StreamReply:
    await call.write(pb.StreamRequest(items=[item(sid, rid, tokens(7))]))
    reply = (await call.read()).replies[0]
    assert not reply.error.code, reply.error.message
    return reply


async def test_a_revoked_token_ends_its_open_stream_and_nothing_after_is_applied(
    server_factory: ServerFactory,
    token_file: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real once-a-second re-read: once new calls with bob's token are refused, his open
    Stream is too, at its next message, which is not fed; alice's stream goes on. (The
    revocation watch is kept away: this is the message's own check.)"""
    monkeypatch.setattr(revocation_watch, "WATCH_EVERY_S", 3600.0)
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub, registry = pb_grpc.SessionServiceStub(channel), reg_grpc.ModelRegistryStub(channel)
        bob_sid, alice_sid = await _create(stub, tok["bob"]), await _create(stub, tok["alice"])
        bob, alice = (
            stub.Stream(metadata=_bearer(tok["bob"])),
            stub.Stream(metadata=_bearer(tok["alice"])),
        )
        assert (await _feed(bob, bob_sid, "1")).position == 1
        await _feed(alice, alice_sid, "1")

        before = _rewrite(path, "bob", None)
        await _until(False, registry, tok["bob"])
        await bob.write(pb.StreamRequest(items=[item(bob_sid, "2", tokens(7))]))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await bob.read()
        assert ended.value.code() == UNAUTHENTICATED
        assert "revoked" in (ended.value.details() or "")
        assert (await _feed(alice, alice_sid, "2")).position == 2  # hers is still good
        await alice.done_writing()

        path.write_text(before)  # bob's token back: his session is where the stream left it
        await _until(True, registry, tok["bob"])
        got = await stub.GetSession(
            pb.GetSessionRequest(session_id=bob_sid), metadata=_bearer(tok["bob"])
        )
        assert got.session.position == 1


@pytest.mark.parametrize("shape", ["one session", "multiplexed"])
async def test_an_idle_stream_ends_when_its_token_is_revoked(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]], shape: str
) -> None:
    """Bob's Stream sends nothing after its first message (one feed: answered in the stream's
    own task; two sessions' feeds: the multiplexer's reader waits): it still ends,
    UNAUTHENTICATED, within a few seconds of the revocation (the tokens file looked at once a
    second by the revocation watch, no call made to prompt it), counted so; alice's idle
    stream stays open and goes on; bob's sessions are where his stream left them."""
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub, registry = pb_grpc.SessionServiceStub(channel), reg_grpc.ModelRegistryStub(channel)
        bob_sids = [
            await _create(stub, tok["bob"]) for _ in range(2 if shape == "multiplexed" else 1)
        ]
        alice_sid = await _create(stub, tok["alice"])
        bob, alice = (
            stub.Stream(metadata=_bearer(tok["bob"])),
            stub.Stream(metadata=_bearer(tok["alice"])),
        )
        await bob.write(pb.StreamRequest(items=[item(s, s, tokens(7)) for s in bob_sids]))
        replies = []
        while len(replies) < len(bob_sids):
            replies += (await bob.read()).replies
        assert [r.position for r in replies] == [1] * len(bob_sids), replies
        await _feed(alice, alice_sid, "1")

        before = _rewrite(path, "bob", None)  # and no call at all made after it
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(bob.read(), timeout=10.0)
        assert ended.value.code() == UNAUTHENTICATED
        assert "revoked" in (ended.value.details() or "")
        counts = await recorded_rpcs(server, "Stream")
        assert counts == {"UNAUTHENTICATED": 1.0}, counts

        assert (await _feed(alice, alice_sid, "2")).position == 2  # hers is still good
        await alice.done_writing()
        counts = await recorded_rpcs(server, "Stream", calls=2)
        assert counts == {"UNAUTHENTICATED": 1.0, "OK": 1.0}, counts

        path.write_text(before)
        await _until(True, registry, tok["bob"])
        for sid in bob_sids:
            got = await stub.GetSession(
                pb.GetSessionRequest(session_id=sid), metadata=_bearer(tok["bob"])
            )
            assert got.session.position == 1
    watch = server.parts.auth.revocations
    assert watch is not None and watch.ended == 1 and len(watch) == 0


async def test_streams_feeding_generating_and_idle_all_end_when_revoked(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]]
) -> None:
    """The watch and the calls' own checks race (a stream feeding as fast as it can, one
    generating, one idle, with the real once-a-second re-read): each call ends once, with
    UNAUTHENTICATED, none with another status, and the server goes on serving alice."""
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        sids = [await _create(stub, tok["bob"]) for _ in range(3)]
        calls = [stub.Stream(metadata=_bearer(tok["bob"])) for _ in sids]
        feeding, generating, idle = calls
        await _feed(idle, sids[2], "1")
        generate = types.Sampling(max_tokens=MAX_TOKENS)
        await generating.write(
            pb.StreamRequest(items=[item(sids[1], "g", tokens(1), generate=generate)])
        )
        assert (await generating.read()).replies[0].HasField("token")

        async def feed_on() -> int:
            n = 0
            while True:
                try:
                    await _feed(feeding, sids[0], str(n))
                except asyncio.InvalidStateError:  # ended (by the watch) between two feeds
                    await feeding.read()  # raises the call's status
                n += 1

        async def generate_on() -> None:
            # A fast host can finish a whole generation before the re-read: the stream then
            # starts another, so it is generating whenever the revocation lands.
            k = 0
            while True:
                replies = (await generating.read()).replies
                if any(r.token.finish_reason for r in replies):
                    k += 1
                    again = item(sids[1], f"g{k}", tokens(1), generate=generate)
                    try:
                        await generating.write(pb.StreamRequest(items=[again]))
                    except asyncio.InvalidStateError:  # ended (by the watch) meanwhile
                        await generating.read()  # raises the call's status

        feeder, generator = asyncio.create_task(feed_on()), asyncio.create_task(generate_on())
        await asyncio.sleep(0.3)  # both running
        assert not feeder.done() and not generator.done()
        _rewrite(path, "bob", None)
        for running in (feeder, generator, asyncio.ensure_future(idle.read())):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(running, timeout=10.0)
            assert ended.value.code() == UNAUTHENTICATED, ended.value
        counts = await recorded_rpcs(server, "Stream", calls=3)
        assert counts == {"UNAUTHENTICATED": 3.0}, counts

        alice_sid = await _create(stub, tok["alice"])
        alice = stub.Stream(metadata=_bearer(tok["alice"]))
        assert (await _feed(alice, alice_sid, "1")).position == 1
        await alice.done_writing()
        counts = await recorded_rpcs(server, "Stream", calls=4)
        assert counts == {"UNAUTHENTICATED": 3.0, "OK": 1.0}, counts
    watch = server.parts.auth.revocations
    assert watch is not None and len(watch) == 0  # every call, ended or not, let go


@pytest.mark.parametrize("change", ["revoked", "made admin"])
async def test_a_changed_token_ends_a_stream_while_it_generates(
    server_factory: ServerFactory,
    token_file: tuple[Path, dict[str, str]],
    reread_at_once: None,
    change: str,
) -> None:
    """A generation running on the stream (the multiplexed path) ends at its next token."""
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        sid = await _create(stub, tok["bob"])
        call = stub.Stream(metadata=_bearer(tok["bob"]))
        generate = types.Sampling(max_tokens=MAX_TOKENS)
        await call.write(pb.StreamRequest(items=[item(sid, "g", tokens(1), generate=generate)]))
        first = (await call.read()).replies[0]
        assert first.HasField("token"), first
        if change == "revoked":
            _rewrite(path, "bob", None)
        else:
            line = next(r for r in path.read_text().splitlines() if r.startswith("bob "))
            _rewrite(path, "bob", line.replace(" client ", " admin "))
        got = 1
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                replies = (await call.read()).replies
                got += len(replies)
                assert not any(r.token.finish_reason for r in replies), "it outlived its token"
        assert ended.value.code() == UNAUTHENTICATED
        assert got < MAX_TOKENS


async def test_a_revoked_token_ends_its_generate_call(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]], reread_at_once: None
) -> None:
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        sid = await _create(stub, tok["bob"])
        request = pb.GenerateRequest(
            session_id=sid, prompt=tokens(1), sampling=types.Sampling(max_tokens=MAX_TOKENS)
        )
        call = stub.Generate(request, metadata=_bearer(tok["bob"]))
        assert (await call.read()).token
        _rewrite(path, "bob", None)
        got = 1
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                response = await call.read()
                assert response is not grpc.aio.EOF, "the generation outlived its token"
                got += 1
        assert ended.value.code() == UNAUTHENTICATED
        assert got < MAX_TOKENS


async def test_an_edit_that_changes_no_token_leaves_open_streams_alone(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]], reread_at_once: None
) -> None:
    """A comment added, another principal's token added: bob's stream goes on."""
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        sid = await _create(stub, tok["bob"])
        call = stub.Stream(metadata=_bearer(tok["bob"]))
        await _feed(call, sid, "1")
        path.write_text(path.read_text() + "# a comment\n")
        await _feed(call, sid, "2")
        add_token(path, "carol", "client")
        assert (await _feed(call, sid, "3")).position == 3
        await call.done_writing()

"""A session that ended stays so across restarts: a real `seqserve serve` process (auth on, the
local state directory) is killed with SIGKILL or stopped with SIGTERM and started again, more
than once; a late GetSession for a closed session hears FAILED_PRECONDITION "was closed", for
an expired one NOT_FOUND "expired after its idle TTL", as before the first restart, and only
from its owner: another caller hears the NOT_FOUND of an id that never existed. Before the
journal kept them in its `ended` file, that held after one SIGKILL only (the END record was
still in the journal) and never after a clean stop (it deletes every segment)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.security.tokens import add_token
from tests.deploy.exposition import scrape
from tests.polling import until

from .support import expect_status, tokens
from .test_lifecycle_restart import ServerProcess

pytestmark = pytest.mark.integration

Tokens = dict[str, str]


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def tok(tmp_path: Path) -> Tokens:
    path = tmp_path / "tokens"
    return {name: add_token(path, name, "client") for name in ("alice", "bob")}


@pytest.fixture
def server(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ServerProcess]:
    monkeypatch.setenv("SEQSERVE_SESSIONS__SWEEP_INTERVAL_SECONDS", "0.1")
    extra = ("--auth-tokens", str(tmp_path / "tokens"), "--metrics-port", "0")  # see _swept
    proc = ServerProcess(store_root, tmp_path / "state", tmp_path, extra=extra)
    try:
        yield proc
    finally:
        proc.kill()


async def _restart(server: ServerProcess, how: str) -> None:
    if how == "kill":
        server.kill()
    else:
        assert await server.terminate() == 0, server.log_text()
    await server.start()


async def _get(stub: pb_grpc.SessionServiceStub, sid: str, token: str) -> None:
    """GetSession for `sid`, which must fail (retried while the server is still recovering)."""
    request = pb.GetSessionRequest(session_id=sid)
    for _ in range(200):
        try:
            await stub.GetSession(request, metadata=_bearer(token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"session {sid} is live")
    raise AssertionError("the server stayed UNAVAILABLE")


async def _position(stub: pb_grpc.SessionServiceStub, sid: str, token: str) -> int:
    """GetSession's position for `sid` (retried while the server is still recovering)."""
    request = pb.GetSessionRequest(session_id=sid)
    for _ in range(200):
        try:
            got = await stub.GetSession(request, metadata=_bearer(token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)
        else:
            return got.session.position
    raise AssertionError("the server stayed UNAVAILABLE")


async def _swept(server: ServerProcess) -> None:
    """Wait until the server's sweeper has ended a session as expired (its metrics count it),
    however late its turn comes on a loaded host: a GetSession hears "expired" as soon as the
    TTL lapses, but only the sweeper's end is journaled, and a start after SIGKILL gives a
    session not yet swept a new idle clock (it is live again)."""
    port = json.loads(server.port_file.read_text())["metrics_port"]

    async def expired() -> bool:
        return (await scrape(port)).total("seqserve_session_events_total", event="expired") >= 1

    await until(expired, 60, "the sweeper to end a session as expired", interval=0.1)


async def _expect_ended(server: ServerProcess, tok: Tokens, closed: str, expired: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        precondition = grpc.StatusCode.FAILED_PRECONDITION
        await expect_status(_get(stub, closed, tok["alice"]), precondition, "was closed")
        not_found = grpc.StatusCode.NOT_FOUND  # SessionExpired's, with its own message
        await expect_status(_get(stub, expired, tok["alice"]), not_found, "expired after its")
        for sid in (closed, expired):  # bob hears what an unknown id gets, word for word
            details = await expect_status(_get(stub, sid, tok["bob"]), grpc.StatusCode.NOT_FOUND)
            assert details == f"session {sid!r} not found"


async def _end_two(server: ServerProcess, tok: Tokens) -> tuple[str, str]:
    """Alice's sessions: one fed and closed, one left to expire (its end swept)."""
    alice = _bearer(tok["alice"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        made = await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=alice)
        closed = made.session.session_id
        await stub.Step(pb.StepRequest(session_id=closed, input=tokens(1, 2)), metadata=alice)
        await stub.CloseSession(pb.CloseSessionRequest(session_id=closed), metadata=alice)
        request = pb.CreateSessionRequest(model="tok", ttl=Duration(seconds=1))
        expired = (await stub.CreateSession(request, metadata=alice)).session.session_id
    await _swept(server)  # its TTL, then a sweeper's turn (every 0.1 s) ended it
    await _expect_ended(server, tok, closed, expired)
    return closed, expired


async def test_ended_sessions_say_why_after_every_restart(
    server: ServerProcess, tok: Tokens, tmp_path: Path
) -> None:
    """Two SIGKILLs in a row (the second start found no END record left: the first one's
    recovery deleted its segment), then a clean stop (which deletes every segment)."""
    await server.start()
    closed, expired = await _end_two(server, tok)
    for how in ("kill", "kill", "term"):
        await _restart(server, how)
        await _expect_ended(server, tok, closed, expired)
    assert (tmp_path / "state" / "journal" / "ended").exists()  # what keeps them


async def test_an_end_whose_segment_was_deleted_while_serving_survives_sigkill(
    server: ServerProcess, tok: Tokens, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 KB segments and a checkpoint every 8 steps: the segment holding the END records is
    deleted while the server runs (steps of another session fill the next ones), so the journal
    no longer has them when the server is killed: the ended file does."""
    monkeypatch.setenv("SEQSERVE_SESSIONS__JOURNAL_SEGMENT_BYTES", "4096")
    monkeypatch.setenv("SEQSERVE_SESSIONS__CHECKPOINT_STEPS", "8")
    journal = tmp_path / "state" / "journal"
    await server.start()
    closed, expired = await _end_two(server, tok)
    segment = max(int(p.stem) for p in journal.glob("*.log"))  # where the ENDs went, or before
    alice = _bearer(tok["alice"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        busy = await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=alice)
        deadline = time.monotonic() + 60
        while min(int(p.stem) for p in journal.glob("*.log")) <= segment:
            assert time.monotonic() < deadline, "the segment was never deleted"
            request = pb.StepRequest(session_id=busy.session.session_id, input=tokens(*range(50)))
            await stub.Step(request, metadata=alice)
    await _restart(server, "kill")
    await _expect_ended(server, tok, closed, expired)


async def test_without_a_journal_each_clean_stop_keeps_why_sessions_ended(
    server: ServerProcess, tok: Tokens, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`durability = "shutdown"`: nothing is journaled, so a clean stop writes the answers and
    a start reads them: they hold across clean restarts, and after a SIGKILL that follows one
    (the file is the last clean stop's). An end after that stop is lost to a SIGKILL: its id
    answers NOT_FOUND, as the README says."""
    monkeypatch.setenv("SEQSERVE_SESSIONS__DURABILITY", "shutdown")
    journal = tmp_path / "state" / "journal"
    await server.start()
    closed, expired = await _end_two(server, tok)
    for how in ("term", "term", "kill"):
        await _restart(server, how)
        await _expect_ended(server, tok, closed, expired)
    assert (journal / "ended").exists() and not list(journal.glob("*.log"))  # no journal
    alice = _bearer(tok["alice"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        made = await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=alice)
        late = made.session.session_id
        await stub.CloseSession(pb.CloseSessionRequest(session_id=late), metadata=alice)
        await expect_status(_get(stub, late, tok["alice"]), grpc.StatusCode.FAILED_PRECONDITION)
    await _restart(server, "kill")
    await _expect_ended(server, tok, closed, expired)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        details = await expect_status(_get(stub, late, tok["alice"]), grpc.StatusCode.NOT_FOUND)
        assert details == f"session {late!r} not found"


async def test_a_journal_a_crash_left_is_recovered_before_a_start_without_one(
    server: ServerProcess, tok: Tokens, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL with the journal, then a start with `durability = "shutdown"`. It served without
    the journal's steps (here NOT_FOUND: nothing of the session was checkpointed), and the next
    start with the journal replayed them: the session was live again, one closed meanwhile
    too. Now that start refuses (exit 2, one line naming the setting) and leaves the journal;
    the start with the journal recovers the session, and once it stopped cleanly the start
    without the journal serves it, and its close there holds across a start with the journal."""
    alice = _bearer(tok["alice"])
    journal = tmp_path / "state" / "journal"
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        made = await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=alice)
        sid = made.session.session_id
        await stub.Step(pb.StepRequest(session_id=sid, input=tokens(1, 2, 3)), metadata=alice)
    server.kill()
    segments = sorted(journal.glob("*.log"))
    monkeypatch.setenv("SEQSERVE_SESSIONS__DURABILITY", "shutdown")
    with pytest.raises(AssertionError, match="server exited 2"):
        await server.start()
    assert "start once with SEQSERVE_SESSIONS__DURABILITY=journal" in server.log_text()
    assert sorted(journal.glob("*.log")) == segments  # left for the start with the journal

    monkeypatch.setenv("SEQSERVE_SESSIONS__DURABILITY", "journal")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        assert await _position(stub, sid, tok["alice"]) == 3
    assert await server.terminate() == 0, server.log_text()

    monkeypatch.setenv("SEQSERVE_SESSIONS__DURABILITY", "shutdown")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        assert await _position(stub, sid, tok["alice"]) == 3
        await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=alice)
    assert await server.terminate() == 0, server.log_text()

    monkeypatch.setenv("SEQSERVE_SESSIONS__DURABILITY", "journal")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        await expect_status(
            _get(stub, sid, tok["alice"]), grpc.StatusCode.FAILED_PRECONDITION, "was closed"
        )

"""kill -9 loses no acknowledged step. A real `seqserve serve` process under load from 64
sessions is killed with SIGKILL at a random moment, twice, and restarted on the same directory;
each session must then be at the position of its last acknowledged reply (or one step beyond,
when its step was journaled but the reply was lost), and its next prediction must equal an
independent NumPy run of the article's equations over exactly those inputs."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from tests.polling import until

from .support import ReferenceSession, assert_matches_reference, tokens
from .test_lifecycle_restart import ServerProcess

pytestmark = pytest.mark.integration

SESSIONS = 64


@dataclass
class Fed:
    session_id: str
    acked: list[int] = field(default_factory=list)  # inputs whose reply came back
    in_flight: list[int] = field(default_factory=list)  # sent, no reply (yet)


async def _load(client: SeqServeClient, fed: Fed, rng: random.Random) -> None:
    """Steps of 1-3 tokens until the server goes away."""
    while True:
        chunk = [rng.randrange(256) for _ in range(rng.randint(1, 3))]
        fed.in_flight = chunk
        try:
            reply = await client.sessions.Step(
                pb.StepRequest(session_id=fed.session_id, input=tokens(*chunk)), timeout=10
            )
        except grpc.aio.AioRpcError:
            return
        assert reply.position == len(fed.acked) + len(chunk)
        fed.acked += chunk
        fed.in_flight = []


async def _check(client: SeqServeClient, store_root: Path, fed: Fed) -> None:
    """Position: acknowledged, or acknowledged plus the chunk in flight; then the prediction
    after one more token equals the reference over exactly those inputs."""
    got = await client.sessions.GetSession(pb.GetSessionRequest(session_id=fed.session_id))
    position = got.session.position
    if position == len(fed.acked) + len(fed.in_flight) and fed.in_flight:
        fed.acked += fed.in_flight  # journaled before the crash, reply lost
    assert position == len(fed.acked), (fed.session_id, position, len(fed.acked))
    fed.in_flight = []
    reference = ReferenceSession(store_root, "tok")
    if fed.acked:
        reference.feed(fed.acked)
    reply = await client.sessions.Step(pb.StepRequest(session_id=fed.session_id, input=tokens(7)))
    assert reply.position == len(fed.acked) + 1
    assert_matches_reference(reply.prediction, reference.feed([7])[-1])
    fed.acked.append(7)


@pytest.mark.parametrize("segments", ["default", "small"])
async def test_sigkill_under_load_loses_no_acknowledged_step(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, segments: str
) -> None:
    """`small`: 4 KB journal segments and a checkpoint every 8 steps, so segments fill, roll
    and fall free all through the load, and the kill lands while the journal's threads have
    full segments still to sync, close or delete."""
    if segments == "small":
        monkeypatch.setenv("SEQSERVE_SESSIONS__JOURNAL_SEGMENT_BYTES", "4096")
        monkeypatch.setenv("SEQSERVE_SESSIONS__CHECKPOINT_STEPS", "8")
    rng = random.Random(20261130)
    server = ServerProcess(store_root, tmp_path / "state", tmp_path, slots=48)
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            sessions = [
                Fed((await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok")))
                    .session.session_id)
                for _ in range(SESSIONS)
            ]  # fmt: skip
        for _round in range(2):
            async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
                load = [
                    asyncio.create_task(_load(client, fed, random.Random(rng.random())))
                    for fed in sessions
                ]
                await asyncio.sleep(rng.uniform(0.5, 1.5))  # a random moment under load
                server.kill()
                await asyncio.wait_for(asyncio.gather(*load), 30)
            assert sum(len(f.acked) for f in sessions) > SESSIONS, "the load ran"
            await server.start()
            async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
                for fed in sessions:
                    await _check(client, store_root, fed)
    finally:
        server.kill()
    assert "recovered" in server.log_text()
    if segments == "small":  # segments did roll and were deleted on the way
        seqs = [int(p.stem) for p in (tmp_path / "state" / "journal").glob("*.log")]
        # (How many depends on how fast the host ran in the random window: 16 on a loaded one.)
        assert max(seqs) > 4 and len(seqs) < max(seqs)


async def _idle_checkpoint(server: ServerProcess, record: Path) -> Path:
    """`record`, once the server's idle sweep has written it (within a second)."""
    await until(
        record.exists, 10, f"an idle checkpoint {record}", interval=0.05, detail=server.log_text
    )
    return record


async def test_a_retry_after_sigkill_gets_the_reply_its_checkpoint_kept(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step with a request id, then the session's idle checkpoint (which records its last
    reply), then SIGKILL: the restarted server answers the retry with the original reply,
    per-position predictions included, and applies nothing again."""
    monkeypatch.setenv("SEQSERVE_SESSIONS__CHECKPOINT_IDLE_SECONDS", "0.2")
    monkeypatch.setenv("SEQSERVE_SESSIONS__SWEEP_INTERVAL_SECONDS", "0.2")
    state = tmp_path / "state"
    server = ServerProcess(store_root, state, tmp_path)
    request = pb.StepRequest(input=tokens(3, 4, 5), request_id="r-1", expected_position=0)
    request.options.top_k, request.options.per_position = 7, True
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            request.session_id = created.session.session_id
            original = await client.sessions.Step(request)
        await _idle_checkpoint(server, state / f"{request.session_id}.spill")
        server.kill()
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            retried = await client.sessions.Step(request)
            got = await client.sessions.GetSession(
                pb.GetSessionRequest(session_id=request.session_id)
            )
    finally:
        server.kill()
    assert original.position == 3 and len(original.per_position) == 3
    assert retried == original  # the same reply, every field
    assert got.session.position == 3  # nothing applied again
    reference = ReferenceSession(store_root, "tok")
    assert_matches_reference(retried.prediction, reference.feed([3, 4, 5])[-1])


async def test_a_checkpoint_damaged_past_its_header_is_rebuilt_from_the_journal_after_sigkill(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session fed, its idle checkpoint written, the server killed with SIGKILL, and a byte
    of the checkpoint's state flipped (its header intact, so start-up takes it for good). The
    journal still holds the session's CREATE and every step since, so the restarted server
    rebuilds its state from them: the next step predicts what the NumPy reference does over
    all the inputs, and a retry of the last request still gets its original reply."""
    monkeypatch.setenv("SEQSERVE_SESSIONS__CHECKPOINT_IDLE_SECONDS", "0.2")
    monkeypatch.setenv("SEQSERVE_SESSIONS__SWEEP_INTERVAL_SECONDS", "0.2")
    state = tmp_path / "state"
    server = ServerProcess(store_root, state, tmp_path)
    request = pb.StepRequest(input=tokens(3, 4, 5), request_id="r-1", expected_position=2)
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            created = await client.sessions.CreateSession(
                pb.CreateSessionRequest(model="tok", prefix=tokens(1, 2))
            )
            request.session_id = created.session.session_id
            original = await client.sessions.Step(request)
        record = await _idle_checkpoint(server, state / f"{request.session_id}.spill")
        server.kill()
        data = bytearray(record.read_bytes())
        data[-32 - 5] ^= 0xFF  # in the state arrays, before the SHA-256 that ends the record
        record.write_bytes(bytes(data))

        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            retried = await client.sessions.Step(request)
            reply = await client.sessions.Step(
                pb.StepRequest(session_id=request.session_id, input=tokens(7))
            )
    finally:
        server.kill()
    assert retried == original and original.position == 5
    assert reply.position == 6
    reference = ReferenceSession(store_root, "tok")
    assert_matches_reference(reply.prediction, reference.feed([1, 2, 3, 4, 5, 7])[-1])
    assert "rebuilt from its journal" in server.log_text()
    assert bytes(data) != record.read_bytes()  # the rebuilt checkpoint replaced it

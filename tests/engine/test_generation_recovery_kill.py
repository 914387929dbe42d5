"""A generation whose prompt the disk refused, then kill -9 of a real `seqserve serve`: its
GEN_START is in the journal, its prompt is not; after the restart the retry of the Step before it
still gets that Step's reply (the in-process case, with every way a prompt goes unapplied, is
test_generation_recovery.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.registry.store import ModelStore
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions import spill_record
from tests.api.conftest import TOKEN_CONFIG, publish_random
from tests.api.support import tokens
from tests.api.test_lifecycle_restart import ServerProcess
from tests.tmpfs import fill, mounted_tmpfs

pytestmark = pytest.mark.integration

PAGE = 4096  # tmpfs: the segment's last page takes writes on a full disk
PROMPT = 1000  # tokens: a record of 4 KB, more than that page holds


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """The api tests' `tok` (ServerProcess sizes its pool for it)."""
    root = tmp_path / "store"
    publish_random(ModelStore(root), "tok", TOKEN_CONFIG, seed=1)
    return root


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", "size=2m") as disk:
        yield disk


def _segment(state: Path) -> Path:
    """The journal segment being written (the newest)."""
    return max((state / "journal").glob("*.log"), key=lambda p: int(p.name.split(".")[0]))


async def test_a_generation_whose_prompt_the_disk_refused_changes_no_reply_after_a_kill(
    small_disk: Path, store_root: Path, tmp_path: Path
) -> None:
    state = small_disk / "state"
    server = ServerProcess(store_root, state, tmp_path)
    step = pb.StepRequest(input=tokens(3, 4, 5), request_id="r1")
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            made = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            sid = step.session_id = made.session.session_id
            # Fed so that the segment's last page has about 2 KB left after r1: room for the
            # GEN_START, none for the prompt.
            pad = ((PAGE // 2 - _segment(state).stat().st_size - 120) % PAGE) // 4 + 1
            await client.sessions.Step(pb.StepRequest(session_id=sid, input=tokens(*[1] * pad)))
            step.expected_position = pad
            original = await client.sessions.Step(step)
            room = -_segment(state).stat().st_size % PAGE
            assert 600 < room < 4 * PROMPT, room
            filler = fill(small_disk)
            generate = pb.GenerateRequest(
                session_id=sid, prompt=tokens(*[7] * PROMPT), request_id="g1",
                expected_position=original.position,
            )  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [r async for r in client.sessions.Generate(generate)]
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        server.kill()  # SIGKILL: the journal as the disk has it
        filler.unlink()
        journal = b"".join(p.read_bytes() for p in sorted((state / "journal").glob("*.log")))
        kinds = [r.kind for r in js.decode_stream(journal) if r.session_id == sid]
        assert kinds[-1] == jr.GEN_START, "the case: g1's start journaled, its prompt not"
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            retried = await client.sessions.Step(step)
            got = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
    finally:
        server.kill()
    assert retried == original  # the same reply, every field
    assert got.session.position == pad + 3  # nothing applied again


# The most a generation may ask for: the server generates ahead of what the client has read
# (about 0.4 ms a token here), so the kill after KILL_AFTER tokens lands inside the generation
# unless the client stalls for most of a second. With 30 a stall of about 10 ms on a loaded CI
# machine let the first server finish it before the kill: not the case tested below.
GEN_TOKENS = 2048
KILL_AFTER = 6  # tokens received by each of the first two calls before the kill


async def _fed_session(client: SeqServeClient) -> str:
    """A session of seed 7 fed five tokens (position 5)."""
    made = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", seed=7))
    sid = made.session.session_id
    await client.sessions.Step(pb.StepRequest(session_id=sid, input=tokens(60, 61, 62, 63, 64)))
    return sid


def _generate(sid: str) -> pb.GenerateRequest:
    sampling = types.Sampling(temperature=1.0, max_tokens=GEN_TOKENS)
    return pb.GenerateRequest(
        session_id=sid, request_id="GEN", expected_position=5, sampling=sampling
    )


async def test_a_generation_retried_across_two_kills_sends_its_tokens_again_and_goes_on(
    store_root: Path, tmp_path: Path
) -> None:
    """Generate killed (SIGKILL) mid-stream, retried after the restart, killed again mid-stream,
    retried again: each retry sends every token applied so far, then the same generation goes
    on, to the tokens of an uninterrupted generation of the same seed. After the first restart
    the replay checkpoints the session inside the generation, and the retry's tokens are
    journaled without a GEN_START of their own: the second recovery goes on with the
    generation that checkpoint holds (it answered FAILED_PRECONDITION, at position 17 not 5)."""
    state = tmp_path / "state"
    server = ServerProcess(store_root, state, tmp_path)
    calls: list[list[tuple[int, types.GeneratedToken]]] = []
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            ref = await _fed_session(client)
            reference = [
                (r.position, r.token) async for r in client.sessions.Generate(_generate(ref))
            ]
            sid = await _fed_session(client)
        assert len(reference) == GEN_TOKENS
        for call in range(3):
            got: list[tuple[int, types.GeneratedToken]] = []
            async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
                async for r in client.sessions.Generate(_generate(sid)):
                    got.append((r.position, r.token))
                    if call < 2 and len(got) == len(calls[-1] if calls else []) + KILL_AFTER:
                        server.kill()  # SIGKILL mid-stream
                        break
            calls.append(got)
            if call == 1:  # the case: a checkpoint inside the generation, holding it
                header = spill_record.decode((state / f"{sid}.spill").read_bytes(), sid).header
                assert header.last_request is not None
                assert header.last_request["request_id"] == "GEN"
                assert header.last_request["position"] == 5
                assert 5 < header.position < 5 + GEN_TOKENS, "the first kill came after the end"
            if call < 2:
                await server.start()
    finally:
        server.kill()
    assert calls[0] == reference[:KILL_AFTER]
    assert calls[1] == reference[: 2 * KILL_AFTER]  # the first call's tokens again, then on
    assert calls[2] == reference  # both calls' tokens again, then on to the same end
    assert reference[-1][1].finish_reason == types.FINISH_REASON_MAX_TOKENS

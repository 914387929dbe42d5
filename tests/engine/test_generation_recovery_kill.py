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
from service.registry.store import ModelStore
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
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

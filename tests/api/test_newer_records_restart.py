"""A downgrade after a crash: a real `seqserve serve` process, SIGKILLed, leaves a journal whose
last record of one session a newer seqserve wrote (its format version above this server's).
Started again on that directory, this server must not serve that session a step short as if
nothing happened: it refuses it as the shared tier does (FAILED_PRECONDITION,
VERSION_UNAVAILABLE, "a newer seqserve"), at every restart, clean ones included, and keeps its
records, so a server that reads them (here: the record's version put back, standing in for the
newer seqserve) serves it whole. Another session goes on as usual."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.sessions import journal_record as jr
from tests.newer_records import NEWER_JOURNAL, set_journal_version

from .support import expect_status, tokens
from .test_create_retry_restart import _recovered
from .test_lifecycle_restart import ServerProcess, server_process  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


async def _step(client: SeqServeClient, sid: str, *ids: int) -> pb.StepResponse:
    return await client.sessions.Step(pb.StepRequest(session_id=sid, input=tokens(*ids)))


async def test_a_session_a_newer_server_journaled_is_refused_and_kept_across_restarts(
    server_process: ServerProcess,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEQSERVE_SESSIONS__CHECKPOINT_IDLE_SECONDS", "3600")  # journal only
    journal = tmp_path / "spill" / "journal"
    await server_process.start()
    async with SeqServeClient(f"127.0.0.1:{server_process.port}") as live:
        made = [
            (
                await live.sessions.CreateSession(pb.CreateSessionRequest(model="tok", seed=5))
            ).session.session_id
            for _ in range(2)
        ]
        for k in (1, 2, 3):
            for sid in made:
                assert (await _step(live, sid, k)).position == k
    newer, fine = made
    server_process.kill()
    # A downgrade: the newer session's last step (at position 2) is a newer server's record.
    assert set_journal_version(journal, newer, 2, jr.VERSION, NEWER_JOURNAL) == 1

    refused = ("a newer seqserve wrote",)
    for restart in ("after the kill", "after a clean stop"):
        await server_process.start()
        async with SeqServeClient(f"127.0.0.1:{server_process.port}") as live:
            await _recovered(live.sessions, fine)
            got = live.sessions.GetSession(pb.GetSessionRequest(session_id=newer), timeout=10)
            await expect_status(
                got, grpc.StatusCode.FAILED_PRECONDITION, *refused, reason="VERSION_UNAVAILABLE"
            )
            await expect_status(
                _step(live, newer, 4), grpc.StatusCode.FAILED_PRECONDITION, *refused,
                reason="VERSION_UNAVAILABLE",
            )  # fmt: skip
            if restart == "after the kill":
                want = await _step(live, fine, 4)  # the other session goes on
                assert want.position == 4
        assert await server_process.terminate() == 0, server_process.log_text()

    # A server that reads that record (the newer seqserve, started again) serves it whole.
    assert set_journal_version(journal, newer, 2, NEWER_JOURNAL, jr.VERSION) == 1
    await server_process.start()
    async with SeqServeClient(f"127.0.0.1:{server_process.port}") as live:
        await _recovered(live.sessions, newer)
        info = await live.sessions.GetSession(pb.GetSessionRequest(session_id=newer))
        assert info.session.position == 3
        got = await _step(live, newer, 4)
        assert (got.position, got.prediction) == (4, want.prediction)  # as its twin's

"""Faults of the state directory while serving: a full disk (a small tmpfs the test mounts as
root) and an injected write error. A step that cannot be made durable gets UNAVAILABLE naming
the setting (no server path, no other session's id) and changes nothing; once the disk takes
writes again the session goes on exactly; shutdown on a full disk still finishes in bounded
time, and the steps it could not checkpoint come back from the journal."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.sessions.journal import Journal
from service.settings import SessionSettings
from tests.polling import until
from tests.tmpfs import fill, mounted_tmpfs

from .conftest import ServerFactory, make_settings
from .support import ReferenceSession, assert_matches_reference, code_value, item, tokens


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", "size=2m") as disk:
        yield disk


def _break(journal: Journal) -> None:
    """An I/O error on the journal's next write (EBADF: its file is now read-only)."""
    assert journal._fd is not None
    os.close(journal._fd)
    journal._fd = os.open(os.devnull, os.O_RDONLY)


async def _step(client: SeqServeClient, sid: str, *ids: int) -> pb.StepResponse:
    return await client.sessions.Step(pb.StepRequest(session_id=sid, input=tokens(*ids)))


async def _step_until_refused(
    client: SeqServeClient, sid: str, acked: list[int]
) -> grpc.aio.AioRpcError:
    """Step `sid` on a full disk until a step is refused (the journal's last page still takes
    a few records); the steps taken go on `acked`."""
    for k in range(1000):
        try:
            await _step(client, sid, k % 256)
        except grpc.aio.AioRpcError as exc:
            return exc
        acked.append(k % 256)
    raise AssertionError("the full disk never refused a step")


async def test_a_full_disk_refuses_steps_with_unavailable_and_changes_nothing(
    small_disk: Path, server_factory: ServerFactory, store_root: Path
) -> None:
    server = await server_factory(sessions={"spill_dir": small_disk / "state"})
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        sid = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
        sid = sid.session.session_id
        other = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
        acked = [1, 2]
        await _step(client, sid, *acked)
        filler = fill(small_disk)
        err = await _step_until_refused(client, sid, acked)
        details = err.details() or ""
        assert err.code() == grpc.StatusCode.UNAVAILABLE, details
        assert "SEQSERVE_SESSIONS__SPILL_DIR" in details
        assert str(small_disk) not in details and other.session.session_id not in details
        call = client.sessions.Stream()  # in a Stream: in-band, for that item
        await call.write(pb.StreamRequest(items=[item(sid, "r", tokens(3))]))
        (reply,) = (await call.read()).replies
        assert reply.error.code == code_value(grpc.StatusCode.UNAVAILABLE)
        await call.done_writing()
        got = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
        assert got.session.position == len(acked)
        server.refresh_gauges()
        assert b'seqserve_state_write_failures_total{kind="journal"} 2.0' in server.metrics.render()

        filler.unlink()  # the disk takes writes again: the session goes on exactly
        reference = ReferenceSession(store_root, "tok")
        reference.feed(acked)
        reply = await _step(client, sid, 3)
        assert reply.position == len(acked) + 1
        assert_matches_reference(reply.prediction, reference.feed([3])[-1])


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def _until(check, want: int, seconds: float = 15.0) -> int:  # type: ignore[no-untyped-def]
    """Poll `check()` until it answers `want` (the server looks at its disk once a second)."""
    deadline = time.monotonic() + seconds
    got = await check()
    while got != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        got = await check()
    return got


async def test_a_replica_whose_disk_refuses_writes_is_not_ready_until_it_takes_them_again(
    small_disk: Path, server_factory: ServerFactory, store_root: Path
) -> None:
    """Every step is refused while the disk is full, so the replica says so where balancers
    look: gRPC health NOT_SERVING and `/readyz` 503, liveness still SERVING, reads still
    answered. With no step coming, its once-a-second probe of the disk finds room again, and
    it is ready again without a restart; the session goes on exactly."""
    server = await server_factory(
        sessions={"spill_dir": small_disk / "state"}, server={"metrics_port": 0}
    )
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        (health_pb2.HealthCheckResponse.NOT_SERVING),
    )
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        channel = client.channel
        sid = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
        sid = sid.session.session_id
        acked = [1, 2]
        await _step(client, sid, *acked)
        assert await _health(channel, "") == serving
        assert await asyncio.to_thread(_readyz, server.metrics_port) == 200
        filler = fill(small_disk)
        refused = await _step_until_refused(client, sid, acked)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE

        assert await _until(lambda: _health(channel, ""), not_serving) == not_serving
        for name in ("seqserve.v1.SessionService", "seqserve.v1.ModelRegistry"):
            assert await _health(channel, name) == not_serving
        assert await _health(channel, "seqserve.liveness") == serving
        assert await asyncio.to_thread(_readyz, server.metrics_port) == 503
        got = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
        assert got.session.position == len(acked)  # reads still answered, nothing applied

        filler.unlink()  # room again: no step comes, the probe finds it
        assert await _until(lambda: _health(channel, ""), serving) == serving
        assert await asyncio.to_thread(_readyz, server.metrics_port) == 200
        assert not list((small_disk / "state").rglob(".write-probe-*"))  # the probe's page gone
        reference = ReferenceSession(store_root, "tok")
        reference.feed(acked)
        reply = await _step(client, sid, 3)
        assert reply.position == len(acked) + 1
        assert_matches_reference(reply.prediction, reference.feed([3])[-1])


async def test_a_full_disk_in_the_data_directory_names_the_variable_that_set_it(
    small_disk: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No spill directory given: the state directory is `spill/` in SEQSERVE_DATA_DIR, and a
    step the full disk refuses names that variable (it named SEQSERVE_SESSIONS__SPILL_DIR,
    which the operator never set)."""
    monkeypatch.delenv("SEQSERVE_SESSIONS__SPILL_DIR", raising=False)
    monkeypatch.setenv("SEQSERVE_DATA_DIR", str(small_disk))
    settings = make_settings(store_root, small_disk)
    settings.sessions = SessionSettings()  # the default, in the data directory
    assert settings.sessions.spill_dir == small_disk / "spill"
    server = SeqServeServer(settings)
    await server.start()
    try:
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            sid = created.session.session_id
            fill(small_disk)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                for k in range(1000):  # the journal's last page still takes a few records
                    await _step(client, sid, k % 256)
        details = err.value.details() or ""
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert "SEQSERVE_DATA_DIR" in details and "SPILL_DIR" not in details, details
    finally:
        await server.stop()


async def test_the_server_exports_what_its_state_directory_charges_for_a_write(
    server_factory: ServerFactory,
) -> None:
    """A slow disk shows before it fails: seqserve_state_writes_total and
    seqserve_state_write_seconds_total (mean = seconds ÷ writes) count every checkpoint."""
    server = await server_factory()
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        for k in range(3):
            created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            await _step(client, created.session.session_id, k + 1)
        assert await server.engine.idle_checkpoints.sweep(0.0) == 3
        server.refresh_gauges()
        exposition = server.metrics.render().decode()
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name.startswith("seqserve_state_write")
    }
    assert samples["seqserve_state_writes_total"] == 3
    assert 0 < samples["seqserve_state_write_seconds_total"] < 3.0


async def test_an_injected_write_error_is_refused_and_the_journal_moves_on(
    tmp_path: Path, server_factory: ServerFactory, store_root: Path
) -> None:
    server = await server_factory()
    journal = server.engine.durability.journal
    assert journal is not None
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
        sid = created.session.session_id
        await _step(client, sid, 5)
        segment = journal.segment
        _break(journal)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _step(client, sid, 6)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        reply = await _step(client, sid, 6)  # the next write goes to a new segment
        assert reply.position == 2 and journal.segment == segment + 1
        reference = ReferenceSession(store_root, "tok")
        assert_matches_reference(reply.prediction, reference.feed([5, 6])[-1])


async def test_shutdown_on_a_full_disk_is_bounded_and_the_journal_keeps_the_steps(
    small_disk: Path, server_factory: ServerFactory, store_root: Path
) -> None:
    sessions = {"spill_dir": small_disk / "state", "write_timeout_seconds": 5.0}
    first = await server_factory(sessions=sessions)
    async with SeqServeClient(f"127.0.0.1:{first.port}") as client:
        sids = []
        for k in range(4):
            created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            sids.append(created.session.session_id)
            await _step(client, sids[-1], k + 1, k + 2)
    filler = fill(small_disk)
    started = time.monotonic()
    await first.stop()  # every checkpoint write fails: ENOSPC
    assert time.monotonic() - started < first.settings.server.grace_seconds + 5.0 + 2.0
    filler.unlink()
    second = await server_factory(sessions=sessions)
    async with SeqServeClient(f"127.0.0.1:{second.port}") as client:
        for k, sid in enumerate(sids):  # recovered from the journal
            reference = ReferenceSession(store_root, "tok")
            reference.feed([k + 1, k + 2])
            reply = await _step(client, sid, 9)
            assert reply.position == 3
            assert_matches_reference(reply.prediction, reference.feed([9])[-1])


async def test_idle_checkpoints_the_full_disk_refuses_are_counted(
    small_disk: Path, server_factory: ServerFactory
) -> None:
    """An idle session's checkpoint that fails (ENOSPC) is counted, kind `checkpoint`: it was
    only logged, about once a second, with the journal kept from being trimmed and no alert
    able to see it."""
    sessions = {"spill_dir": small_disk / "state", "checkpoint_idle_seconds": 0.3,
                "sweep_interval_seconds": 0.1}  # fmt: skip
    server = await server_factory(sessions=sessions)
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        for k in range(4):
            created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            await _step(client, created.session.session_id, k + 1)
    filler = fill(small_disk)
    try:

        def failed_checkpoints() -> float:
            failed = 0.0
            server.refresh_gauges()
            for family in text_string_to_metric_families(server.metrics.render().decode()):
                for sample in family.samples:
                    if sample.name == "seqserve_state_write_failures_total" and (
                        sample.labels.get("kind") == "checkpoint"
                    ):
                        failed = sample.value
            return failed

        failed = await until(failed_checkpoints, 10, "a failed checkpoint write", interval=0.1)
        assert failed >= 1
    finally:
        filler.unlink()


async def test_a_real_server_on_a_full_disk_exits_on_sigterm(
    small_disk: Path, store_root: Path, tmp_path: Path
) -> None:
    """The report this answers: SIGTERM on a full spill directory logged "could not be spilled"
    and never exited. A real `seqserve serve` with sessions in memory, the disk full, SIGTERM:
    it exits (within grace + write timeout), and the restart recovers the sessions."""
    from .test_lifecycle_restart import ServerProcess

    server = ServerProcess(store_root, small_disk / "state", tmp_path, slots=8)
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            sid = created.session.session_id
            await _step(client, sid, 4, 5, 6)
        filler = fill(small_disk)
        started = time.monotonic()
        assert await server.terminate() == 0
        assert time.monotonic() - started < 10.0 + 30.0  # grace + write timeout, the defaults
        assert "could not be written at shutdown" in server.log.read_text()
        filler.unlink()
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            reply = await _step(client, sid, 7)
        assert reply.position == 4
        reference = ReferenceSession(store_root, "tok")
        reference.feed([4, 5, 6])
        assert_matches_reference(reply.prediction, reference.feed([7])[-1])
    finally:
        server.kill()


async def test_a_close_the_journal_cannot_record_is_refused_and_the_session_lives_on(
    tmp_path: Path, server_factory: ServerFactory, store_root: Path
) -> None:
    """An END record that is not written would let a crash bring the session back: the close
    is refused with UNAVAILABLE instead, and the session is untouched."""
    server = await server_factory()
    journal = server.engine.durability.journal
    assert journal is not None
    async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
        created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
        sid = created.session.session_id
        await _step(client, sid, 5)
        _break(journal)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "SEQSERVE_SESSIONS__SPILL_DIR" in (err.value.details() or "")
        reply = await _step(client, sid, 6)  # still open, nothing lost
        reference = ReferenceSession(store_root, "tok")
        assert reply.position == 2
        assert_matches_reference(reply.prediction, reference.feed([5, 6])[-1])
        await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await _step(client, sid, 7)
        assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # closed


async def test_shutdown_out_of_time_stops_writing_before_the_versions_close(
    tmp_path: Path,
    server_factory: ServerFactory,
    store_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writing sessions at shutdown ran past its time on a slow disk. The writer stops after the
    session it is on, before the versions whose slots it reads are closed (it used to go on in
    its thread, reading slots of closed pools: "bad free of N"); the sessions it did not write
    come back from the journal."""
    sessions = {"spill_dir": tmp_path / "state", "write_timeout_seconds": 0.3}
    first = await server_factory(sessions=sessions)
    sids = []
    async with SeqServeClient(f"127.0.0.1:{first.port}") as client:
        for k in range(12):
            created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
            sids.append(created.session.session_id)
            await _step(client, sids[-1], k + 1, k + 2)
    tier = first.engine.residency.tier
    write, written = tier.write, []

    def slow_write(*args: object, **kwargs: object) -> None:
        time.sleep(0.1)  # a slow disk: 12 sessions take 1.2 s, the limit is 0.3 s
        write(*args, **kwargs)
        written.append(time.monotonic())

    monkeypatch.setattr(tier, "write", slow_write)
    await first.stop()
    count = len(written)
    assert 0 < count < len(sids)
    time.sleep(0.3)
    assert len(written) == count  # nothing was written after the stop returned
    second = await server_factory(sessions=sessions)
    async with SeqServeClient(f"127.0.0.1:{second.port}") as client:
        for k, sid in enumerate(sids):
            reference = ReferenceSession(store_root, "tok")
            reference.feed([k + 1, k + 2])
            reply = await _step(client, sid, 9)
            assert reply.position == 3
            assert_matches_reference(reply.prediction, reference.feed([9])[-1])


async def test_a_batch_the_full_disk_cut_short_does_not_come_back_after_a_kill(
    small_disk: Path, store_root: Path, tmp_path: Path
) -> None:
    """A real `seqserve serve`, its disk full: a Stream message of two sessions' feeds, a
    short one and a long one, is refused (the disk takes the first record whole and tears the
    second). kill -9, the disk freed, a restart: each session is at the position its last
    acknowledged reply said, the refused feeds applied nowhere (the first record left in the
    segment was replayed: a refused input applied)."""
    from .test_lifecycle_restart import ServerProcess

    server = ServerProcess(store_root, small_disk / "state", tmp_path, slots=8)
    try:
        await server.start()
        acked: dict[str, int] = {}
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            for _ in range(2):
                made = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
                acked[made.session.session_id] = 0
            short, long = list(acked)
            filler = fill(small_disk)
            refused = False
            call = client.sessions.Stream()
            for _ in range(200):
                await call.write(
                    pb.StreamRequest(
                        items=[item(short, "a", tokens(1)), item(long, "b", tokens(*[2] * 900))]
                    )
                )
                replies = []
                while len(replies) < 2:
                    replies.extend((await call.read()).replies)
                for reply in replies:
                    if reply.HasField("error"):
                        refused = True
                    else:
                        acked[reply.session_id] = reply.position
                if refused:
                    break
            await call.done_writing()
            assert refused, "the full disk never refused a message"
        server.kill()  # SIGKILL: no shutdown, the journal as the disk has it
        filler.unlink()
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            for sid, position in acked.items():
                got = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
                assert got.session.position == position, (sid, got.session.position, position)
    finally:
        server.kill()

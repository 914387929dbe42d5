"""`seqserve serve --workers 2`: two real worker processes on one port (SO_REUSEPORT) under a
supervisor, sharing the SQLite state tier in the state directory. Two channels, each on its
own worker, alternate on the same sessions and get exact results; a second server on the port
is refused; a worker killed with SIGKILL is started again and nothing is lost; SIGTERM stops
them all, and a restart finds every session."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from benchmarks.processes import scrape
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from tests.polling import until

from .support import ReferenceSession, assert_matches_reference, tokens
from .test_lifecycle_restart import REPO_ROOT, ServerProcess

pytestmark = pytest.mark.integration


def _calls(metrics_port: int) -> float:
    return scrape(metrics_port).get("seqserve_rpc_duration_seconds_count", 0.0)


async def _channel_per_worker(target: str, metrics: list[int]) -> list[grpc.aio.Channel]:
    """One channel on each worker: the kernel picks a worker per connection, so open
    connections (never shared: a local subchannel pool each) until each worker has one."""
    found: dict[int, grpc.aio.Channel] = {}
    for _ in range(60):
        channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        before = [_calls(m) for m in metrics]
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.SessionServiceStub(channel).GetSession(
                pb.GetSessionRequest(session_id="s_probe.none")
            )
        moved = await until(  # the call is counted just after its reply leaves
            lambda before=before: [i for i, m in enumerate(metrics) if _calls(m) > before[i]],
            60,
            "a worker to count the probe call",
            interval=0.02,
        )
        (worker,) = moved
        if worker in found:
            await channel.close()
        else:
            found[worker] = channel
        if len(found) == len(metrics):
            return [found[i] for i in range(len(metrics))]
    raise AssertionError("60 connections all reached the same worker")


async def test_two_workers_on_one_port_serve_the_same_sessions_exactly(
    store_root: Path, tmp_path: Path
) -> None:
    server = ServerProcess(
        store_root, tmp_path / "state", tmp_path, slots=16,
        extra=("--workers", "2", "--metrics-port", "0", "--http-port", "0"),
    )  # fmt: skip
    try:
        await server.start()
        info = json.loads(server.port_file.read_text())
        target = f"127.0.0.1:{server.port}"
        second = subprocess.run(
            [sys.executable, "-m", "service.cli.main", "serve", "--port", str(server.port),
             "--metrics-port", "-1", "--http-port", "-1", "--spill-dir", str(tmp_path / "other")],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2 and "in use by another seqserve" in second.stderr

        metrics = info["metrics_ports"]
        channels = await _channel_per_worker(target, metrics)
        stubs = [pb_grpc.SessionServiceStub(c) for c in channels]
        made = [await stubs[0].CreateSession(pb.CreateSessionRequest(model="tok", seed=i))
                for i in range(4)]  # fmt: skip
        sids = [m.session.session_id for m in made]
        refs = [ReferenceSession(store_root, "tok") for _ in sids]

        async def step(stub: pb_grpc.SessionServiceStub, k: int, token: int) -> None:
            reply = await stub.Step(
                pb.StepRequest(
                    session_id=sids[k], input=tokens(token), request_id=f"{k}-{refs[k].position}",
                    expected_position=refs[k].position, options=types.PredictionOptions(top_k=3),
                )
            )  # fmt: skip
            assert reply.position == refs[k].position + 1
            assert_matches_reference(reply.prediction, refs[k].feed([token])[-1])

        for r in range(8):  # alternate workers on every session: a takeover each time
            for k in range(len(sids)):
                await step(stubs[r % 2], k, (k * 11 + r) % 256)
        moves = [
            scrape(m).get("seqserve_takeover_seconds_count", 0.0) for m in info["metrics_ports"]
        ]
        assert all(n >= 4 for n in moves), moves
        # The HTTP API shares its port across the workers too, and reads the same sessions.
        http = f"http://127.0.0.1:{info['http_port']}/v1/sessions/{sids[0]}"
        for _ in range(4):  # new connections: either worker
            with urllib.request.urlopen(http, timeout=10) as answer:
                body = json.loads(answer.read())
            assert body["session"]["position"] == str(refs[0].position)

        os.kill(info["workers"][1], signal.SIGKILL)  # the supervisor starts it again
        restarted = "worker 1 exited with status -9: starting it again"
        await until(
            lambda: restarted in server.log_text(),
            10,
            "the supervisor to start worker 1 again",
            interval=0.05,
            detail=server.log_text,
        )
        for r in range(3):
            for k in range(len(sids)):
                await step(stubs[0], k, (k * 7 + r) % 256)
        for c in channels:
            await c.close()
        assert await server.terminate() == 0

        await server.start()  # the sessions are in the state directory's database
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            for k in range(len(sids)):
                await step(stub, k, 42)
        assert await server.terminate() == 0
    finally:
        server.kill()


async def test_workers_stop_when_their_supervisor_is_killed(
    store_root: Path, tmp_path: Path
) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to stop its workers: each
    gets SIGTERM from the kernel instead, drains and exits, so none serves on unsupervised."""
    server = ServerProcess(
        store_root, tmp_path / "state", tmp_path, slots=16,
        extra=("--workers", "2", "--metrics-port", "-1", "--http-port", "-1"),
    )  # fmt: skip
    workers: list[int] = []
    try:
        await server.start()
        workers = json.loads(server.port_file.read_text())["workers"]
        server.kill()
        await until(
            lambda: not any(_alive(pid) for pid in workers),
            30,
            "the workers to exit",
            interval=0.05,
            detail=server.log_text,
        )
        assert server.log_text().count("received SIGTERM: draining") == 2  # each worker drained
    finally:
        server.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its new parent, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"

"""A real `seqserve serve` process with a tiny pool, stopped with SIGTERM and started again on
the same spill directory: every session answers at the same position with the same next
prediction and the same random stream; a record damaged while it was down is DATA_LOSS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.runtime.state_pool import slot_bytes

from .conftest import TOKEN_CONFIG, ServerFactory
from .support import expect_status, tokens

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # python + torch import on a loaded machine
STOP_TIMEOUT_S = 60.0

pytestmark = pytest.mark.integration


class ServerProcess:
    """`python -m service.cli.main serve` on port 0; the port comes back through --port-file.
    Its pool holds `slots` sessions of `tok` (a preloaded `frames` pool gives its bytes back
    when `tok` needs them, while it holds no session)."""

    def __init__(
        self,
        store: Path,
        spill: Path,
        work: Path,
        slots: int = 3,
        port: int = 0,
        extra: tuple[str, ...] = (),
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port_file = work / "port.json"
        self.log = work / "server.log"
        self.slots = slots
        self.args = [
            sys.executable, "-m", "service.cli.main", "serve",
            "--port", str(port), "--metrics-port", "-1", "--http-port", "-1", "--store", str(store),
            "--spill-dir", str(spill), "--port-file", str(self.port_file),
            "--pool-bytes", str(slots * slot_bytes(TOKEN_CONFIG)), "--ttl", "3600", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = -1

    async def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, "SEQSERVE_SESSIONS__POOL_INITIAL_SLOTS": str(self.slots)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{self.log_text()}")
            await asyncio.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.port = ports["port"]
        self.http_port = ports.get("http_port", -1)

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def server_process(store_root: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(store_root, tmp_path / "spill", tmp_path)
    try:
        yield proc
    finally:
        proc.kill()


async def _step(client: SeqServeClient, sid: str, *ids: int) -> pb.StepResponse:
    return await client.sessions.Step(pb.StepRequest(session_id=sid, input=tokens(*ids)))


async def _generate(client: SeqServeClient, sid: str) -> list[int]:
    request = pb.GenerateRequest(
        session_id=sid, sampling=make_sampling(temperature=1.0, max_tokens=6)
    )
    return [r.token.id async for r in client.sessions.Generate(request)]


async def test_sigterm_restart_keeps_every_session(
    server_process: ServerProcess, server_factory: ServerFactory, tmp_path: Path
) -> None:
    reference = await server_factory()  # in-process, roomy: never evicts, never restarts
    await server_process.start()
    pairs: list[tuple[str, str]] = []
    async with (
        SeqServeClient(f"127.0.0.1:{server_process.port}") as live,
        SeqServeClient(f"127.0.0.1:{reference.port}") as ref,
    ):
        for i in range(8):  # more sessions than the 3 slots
            request = pb.CreateSessionRequest(model="tok", seed=i)
            a = (await live.sessions.CreateSession(request)).session.session_id
            b = (await ref.sessions.CreateSession(request)).session.session_id
            chunk = [(i * 13 + k) % 256 for k in range(1 + i % 3)]
            got, want = await _step(live, a, *chunk), await _step(ref, b, *chunk)
            assert got.prediction == want.prediction
            assert await _generate(live, a) == await _generate(ref, b)  # RNG off its seed now
            pairs.append((a, b))
        damaged = (await live.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))).session
    assert await server_process.terminate() == 0, server_process.log_text()
    spill = tmp_path / "spill"
    assert len(list(spill.glob("*.spill"))) == len(pairs) + 1
    record = spill / f"{damaged.session_id}.spill"
    data = bytearray(record.read_bytes())
    data[-64] ^= 0x04
    record.write_bytes(bytes(data))

    await server_process.start()
    async with (
        SeqServeClient(f"127.0.0.1:{server_process.port}") as live,
        SeqServeClient(f"127.0.0.1:{reference.port}") as ref,
    ):
        for a, b in pairs:
            info = (await live.sessions.GetSession(pb.GetSessionRequest(session_id=a))).session
            want_info = (await ref.sessions.GetSession(pb.GetSessionRequest(session_id=b))).session
            assert info.position == want_info.position and info.state == types.SESSION_STATE_SPILLED
            got, want = await _step(live, a, 77), await _step(ref, b, 77)
            assert (got.position, got.prediction) == (want.position, want.prediction)
            assert await _generate(live, a) == await _generate(ref, b)
        await expect_status(
            _step(live, damaged.session_id, 1), grpc.StatusCode.DATA_LOSS, "checksum"
        )
    assert await server_process.terminate() == 0, server_process.log_text()

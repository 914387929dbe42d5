"""`seqserve serve --workers N`'s supervisor locks its HTTP port as well as its gRPC port: the
workers share the HTTP port with SO_REUSEPORT, so without the lock a second, unrelated
supervisor could bind the same HTTP port and the kernel would split requests between them.
(The workers' serving itself is tested in tests/api/test_workers.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0

pytestmark = pytest.mark.integration


def _serve_argv(tmp_path: Path, name: str, http_port: int) -> list[str]:
    return [
        sys.executable, "-m", "service.cli.main", "serve", "--workers", "1", "--port", "0",
        "--http-port", str(http_port), "--metrics-port", "-1",
        "--store", str(REPO_ROOT / "model_store"), "--spill-dir", str(tmp_path / name),
        "--log-level", "warning",
    ]  # fmt: skip


def test_a_second_supervisor_on_the_same_http_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = int(probe.getsockname()[1])
    port_file = tmp_path / "first.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        [*_serve_argv(tmp_path, "a", http_port), "--port-file", str(port_file)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first supervisor did not start"
            time.sleep(0.05)
        second = subprocess.Popen(
            _serve_argv(tmp_path, "b", http_port), cwd=REPO_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, stderr = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # it started: stop it and its workers, then fail
            second.send_signal(signal.SIGTERM)
            _, stderr = second.communicate(timeout=60)
        assert second.returncode == 2, stderr
        assert "Traceback" not in stderr, stderr
        lines = [x for x in stderr.splitlines() if x.startswith("seqserve serve:")]
        assert len(lines) == 1, stderr
        assert f"port {http_port} is in use by another seqserve" in lines[0], lines[0]
        assert "--http-port" in lines[0], lines[0]
        assert first.poll() is None  # the first one serves on
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:  # SIGTERM: the supervisor stops its workers
            first.send_signal(signal.SIGTERM)
            try:
                first.wait(60)
            except subprocess.TimeoutExpired:
                first.kill()
                first.wait()
        log.close()

"""`seqserve serve --workers N`'s supervisor locks its HTTP port as well as its gRPC port: the
workers share the HTTP port with SO_REUSEPORT, so without the lock a second, unrelated
supervisor could bind the same HTTP port and the kernel would split requests between them.
Its `--port-file` (with `--port 0` the only way to learn the ports) is written even when a
worker dies during start-up, and names a worker started again in place of a killed one. Its
temporary directory (the workers' port files) is removed when it exits.
(The workers' serving itself is tested in tests/api/test_workers.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.polling import until_sync
from tests.ports import free_port

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
    http_port = free_port()
    port_file = tmp_path / "first.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        [*_serve_argv(tmp_path, "a", http_port), "--port-file", str(port_file)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def started() -> bool:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        return port_file.exists()

    try:
        until_sync(started, START_TIMEOUT_S, "the first supervisor's port file", interval=0.05)
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


class _Supervisor:
    """`serve --workers 1 --port 0 --metrics-port 0 --port-file F` as a real process: with port
    0 the port file is the only way to learn the ports and the worker's pid."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.port_file = tmp_path / "ports.json"
        self.log_path = tmp_path / "supervisor.log"
        argv = [*_serve_argv(tmp_path, "state", -1), "--port-file", str(self.port_file)]
        argv[argv.index("--metrics-port") + 1] = "0"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")},
               **(env or {})}  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def worker(self) -> int:
        """The pid of the worker once it runs seqserve (not just forked): soon after it starts."""

        def running() -> int | None:
            assert self.proc.poll() is None, self.log_path.read_text()
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            for pid in map(int, children.split()):
                with contextlib.suppress(FileNotFoundError):
                    if b"service.cli.main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return pid
            return None

        return until_sync(running, START_TIMEOUT_S, "a worker running seqserve")

    def ports(self, not_pid: int | None = None) -> dict[str, Any]:
        """The supervisor's port file once it is written (and names a worker other than
        `not_pid`)."""

        def written() -> dict[str, Any] | None:
            assert self.proc.poll() is None, self.log_path.read_text()
            if self.port_file.exists():
                info: dict[str, Any] = json.loads(self.port_file.read_text())
                if not_pid not in info["workers"]:
                    return info
            return None

        return until_sync(
            written,
            START_TIMEOUT_S,
            "a port file naming a new worker",
            interval=0.05,
            detail=self.log_path.read_text,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:  # SIGTERM: the supervisor stops its worker
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _assert_serves(info: dict[str, Any]) -> None:
    """The port file names the live worker and a metrics port that answers."""
    (pid,) = info["workers"]
    os.kill(pid, 0)  # alive
    assert info["metrics_ports"] == [info["metrics_port"]], info
    with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/healthz", timeout=5):
        pass


def test_the_port_file_is_written_after_a_worker_dies_during_start_up(tmp_path: Path) -> None:
    supervisor = _Supervisor(tmp_path)
    try:
        first = supervisor.worker()
        assert not supervisor.port_file.exists()
        os.kill(first, signal.SIGKILL)  # still importing: long before it listens
        info = supervisor.ports(not_pid=first)
        _assert_serves(info)
    finally:
        supervisor.stop()


def test_the_port_file_names_a_restarted_worker(tmp_path: Path) -> None:
    supervisor = _Supervisor(tmp_path)
    try:
        before = supervisor.ports()
        _assert_serves(before)
        os.kill(before["workers"][0], signal.SIGKILL)
        after = supervisor.ports(not_pid=before["workers"][0])
        _assert_serves(after)
        assert after["port"] == before["port"], (before, after)
    finally:
        supervisor.stop()


def test_a_worker_with_a_configuration_error_stops_the_supervisor_at_once(
    tmp_path: Path,
) -> None:
    """A preload naming no model passes the supervisor's checks (it loads no model) and fails
    every worker's start-up with status 2: the supervisor starts none again (before: five
    restarts each, then status 1), stops the others and exits 2, the workers' line shown."""
    argv = [*_serve_argv(tmp_path, "state", -1), "--engine.preload", "nosuch"]
    argv[argv.index("--workers") + 1] = "2"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "starting it again" not in proc.stderr, proc.stderr
    assert "engine.preload: 'nosuch': model 'nosuch' not found" in proc.stderr, proc.stderr
    assert "could not start (status 2, its error above): stopping" in proc.stderr, proc.stderr


def _work_dirs(tmp: Path) -> list[Path]:
    """The supervisors' temporary directories in `tmp` (their TMPDIR)."""
    return list(tmp.glob("seqserve-workers-*"))


def test_the_supervisor_removes_its_temporary_directory_when_it_stops(tmp_path: Path) -> None:
    """Before: every `--workers` run left a `seqserve-workers-*` directory in /tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    supervisor = _Supervisor(tmp_path, env={"TMPDIR": str(tmp)})
    try:
        _assert_serves(supervisor.ports())
        assert len(_work_dirs(tmp)) == 1  # where the workers' port files are
        supervisor.proc.send_signal(signal.SIGTERM)
        assert supervisor.proc.wait(60) == 0, supervisor.log_path.read_text()
        assert _work_dirs(tmp) == []
    finally:
        supervisor.stop()


def test_the_supervisor_removes_its_temporary_directory_when_a_worker_cannot_start(
    tmp_path: Path,
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    argv = [*_serve_argv(tmp_path, "state", -1), "--engine.preload", "nosuch"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env["TMPDIR"] = str(tmp)
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    assert proc.returncode == 2, proc.stderr
    assert "could not start (status 2, its error above): stopping" in proc.stderr, proc.stderr
    assert _work_dirs(tmp) == []


def test_a_database_in_the_data_directory_that_cannot_be_used_names_seqserve_data_dir(
    tmp_path: Path,
) -> None:
    """No spill directory or state URL given: the workers share `spill/state.db` in
    SEQSERVE_DATA_DIR, which the operator set. A damaged one stops every worker with one line
    naming that variable; before, it named SEQSERVE_SESSIONS__STATE_URL (which the supervisor
    set) and --spill-dir, neither of which the operator gave."""
    data = tmp_path / "data"
    (data / "spill").mkdir(parents=True)
    (data / "spill" / "state.db").write_bytes(b"not a database, " * 256)
    argv = _serve_argv(tmp_path, "state", -1)
    del argv[argv.index("--spill-dir") : argv.index("--spill-dir") + 2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env["SEQSERVE_DATA_DIR"] = str(data)
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("seqserve serve: state database")]
    assert lines, proc.stderr
    assert "cannot be used (file is not a database)" in lines[0], lines[0]
    fix = lines[0].split("); ", 1)[1]  # what the line says to do, after the path and the error
    assert fix == "`serve --workers` keeps it in the state directory SEQSERVE_DATA_DIR sets", fix


@pytest.mark.parametrize(
    ("metrics", "said"),
    [
        ("65535", "takes 65535-65536, past 65535; choose a --metrics-port <= 65534 or fewer "
                  "--workers"),
        ("next to --http-port", "takes {m}-{h}, which includes --http-port {h}; choose a "
                                "--metrics-port range clear of it"),
    ],
    ids=["past-65535", "on-the-http-port"],
)  # fmt: skip
def test_metrics_ports_past_65535_or_on_the_http_port_are_refused_before_any_worker(
    tmp_path: Path, metrics: str, said: str
) -> None:
    """Worker i's metrics port is --metrics-port + i: with 65535 worker 1 was refused with a
    setting never given (`must be <= 65535, got 65536 [from flag]`) and its sibling stopped
    "during start-up"; next to --http-port worker 1 collided with the shared HTTP port."""
    http_port = -1 if metrics == "65535" else free_port()
    metrics_port = metrics if metrics == "65535" else str(http_port - 1)
    argv = _serve_argv(tmp_path, "state", http_port)
    argv[argv.index("--workers") + 1] = "2"
    argv[argv.index("--metrics-port") + 1] = metrics_port
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "SIGTERM" not in proc.stderr, proc.stderr
    assert "invalid setting" not in proc.stderr, proc.stderr  # no worker was started
    lines = [x for x in proc.stderr.splitlines() if x.startswith("seqserve serve:")]
    expected = f"--metrics-port {metrics_port} with --workers 2 " + said.format(
        m=metrics_port, h=http_port
    )
    assert lines == [f"seqserve serve: {expected}"], proc.stderr


@pytest.mark.parametrize(
    ("metrics", "count", "port", "http_port", "refused"),
    [
        (65534, 2, 50051, -1, False),
        (65534, 3, 50051, -1, True),
        (9464, 4, 9467, -1, True),  # the gRPC port in the range
        (9464, 4, 50051, 9468, False),
        (9464, 4, 50051, 9464, True),
        (0, 8, 50051, 8080, False),  # each picks a free one
        (-1, 8, 50051, 8080, False),  # off
    ],
)
def test_check_metrics_ports(
    metrics: int, count: int, port: int, http_port: int, refused: bool
) -> None:
    from service.cli.workers import _check_metrics_ports
    from service.errors import InvalidArgument

    if refused:
        with pytest.raises(InvalidArgument, match=f"--metrics-port {metrics} with --workers"):
            _check_metrics_ports(metrics, count, port, http_port)
    else:
        _check_metrics_ports(metrics, count, port, http_port)

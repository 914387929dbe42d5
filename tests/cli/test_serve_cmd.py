"""Flags, env and the config file reach a real `seqserve serve`; `--workers` passes every
setting flag on to its workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.cli.main import build_parser
from service.cli.serve_cmd import worker_argv, write_json_file
from service.cli.settings_flags import given_flags
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


def test_worker_argv_passes_every_given_setting_but_the_ports(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--config", str(tmp_path / "c.toml"), "--store", "/s", "--ttl", "5",
         "--insecure", "--port", "7", "--metrics-port", "8", "--engine.max-batch-size", "8",
         "--no-security.reflection", "--engine.preload", "a:1,b", "--workers", "2"]
    )  # fmt: skip
    argv = worker_argv(args)
    assert argv[0] == "serve" and f"--config={tmp_path / 'c.toml'}" in argv
    again = parser.parse_args(argv)
    expected = {k: v for k, v in given_flags(args).items() if k[0] != "server"}
    assert given_flags(again) == expected
    assert expected[("security", "insecure")] is True
    assert expected[("security", "reflection")] is False
    assert expected[("engine", "preload")] == ["a:1", "b"]
    assert again.config == args.config


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())


@pytest.mark.integration
def test_flags_env_and_config_file_reach_the_server(tmp_path: Path) -> None:
    config = tmp_path / "seqserve.toml"
    config.write_text(
        f'model_store = "{REPO_ROOT / "model_store"}"\n'
        f'[sessions]\nspill_dir = "{tmp_path / "spill"}"\nmax_sessions = 50\n'
    )
    port_file = tmp_path / "port.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env |= {"SEQSERVE_DATA_DIR": str(tmp_path / "data"), "SEQSERVE_SERVER__GRACE_SECONDS": "0.5",
            "SEQSERVE_SERVER__GC_THAW_SECONDS": "0.2"}  # fmt: skip
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve", "--config", str(config),
         "--port", "0", "--metrics-port", "0", "--http-port", "-1", "--max-sessions", "1",
         "--port-file", str(port_file), "--log-level", "warning"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        assert ports["port"] > 0 and ports["metrics_port"] > 0  # --port 0, --metrics-port 0
        metrics_url = f"http://127.0.0.1:{ports['metrics_port']}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=10) as reply:
            assert reply.status == 200
            assert b"seqserve_" in reply.read()
        # serve tunes the GC: the heap is frozen and thawed every 0.2 s (a generation-2
        # collection each; the models were loaded before the hook that times collections).
        thawed = re.compile(rb'^seqserve_gc_pause_seconds_count\{generation="2"\} [1-9]', re.M)
        while not thawed.search(body := _get(metrics_url)):
            assert time.monotonic() < deadline + 30, body.decode()
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            first = stub.CreateSession(pb.CreateSessionRequest(model="bytes-lstm"), timeout=60)
            assert first.session.session_id
            with pytest.raises(grpc.RpcError) as info:  # --max-sessions 1 beat the file's 50
                stub.CreateSession(pb.CreateSessionRequest(model="bytes-lstm"), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (tmp_path / "spill").is_dir()  # the config file's spill_dir
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_an_empty_state_directory_is_refused_and_the_current_one_left_alone(
    tmp_path: Path,
) -> None:
    """`--spill-dir ""` was the current directory: the server claimed it and deleted its
    `*.tmp` and `.spare-*` files at start. Refused now, one line, exit 2, nothing touched."""
    for name in ("draft.tmp", ".spare-1"):
        (tmp_path / name).write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "serve", "--spill-dir", "", "--port", "0",
         "--metrics-port", "-1", "--http-port", "-1", "--store", str(REPO_ROOT / "model_store")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "sessions.spill_dir" in proc.stderr and "must name a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".spare-1", "draft.tmp"]


def _serve(tmp_path: Path, *flags: str, workers: int = 0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", "serve", "--port", "0", "--metrics-port",
         "-1", "--http-port", "-1", "--store", str(REPO_ROOT / "model_store"), "--spill-dir",
         str(tmp_path / "spill"), "--log-level", "info",
         *(["--workers", str(workers)] if workers else []), *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**env, "SEQSERVE_SERVER__GRACE_SECONDS": "0.5"},
    )  # fmt: skip


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("seqserve serve:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["a directory", "in a missing directory"])
def test_a_port_file_that_cannot_be_written_is_refused_before_start_up(
    tmp_path: Path, where: str, workers: int
) -> None:
    """It was a FileNotFoundError / IsADirectoryError traceback once the server served, and a
    directory left `.<name>.<pid>.tmp` in its parent. Now one line, exit 2, nothing started
    and nothing written."""
    parent = tmp_path / "out"
    parent.mkdir()
    target = parent / "ports" if where == "a directory" else parent / "missing" / "p.json"
    if where == "a directory":
        target.mkdir()
    proc = _serve(tmp_path, "--port-file", str(target), workers=workers)
    line = _one_line(proc)
    said = "is a directory" if where == "a directory" else f"no directory {target.parent}"
    assert line == f"seqserve serve: --port-file {target}" + (
        f" {said}; name a file" if where == "a directory" else f": {said}"
    )
    assert "listening" not in proc.stderr, proc.stderr
    assert [p.name for p in parent.iterdir()] == (["ports"] if where == "a directory" else [])
    if where == "a directory":
        assert list(target.iterdir()) == []


@pytest.mark.integration
def test_a_port_file_write_that_fails_after_start_stops_the_server_with_one_line(
    tmp_path: Path,
) -> None:
    """A write that fails once the server listens (here its temporary name is too long for
    the file system; a directory removed meanwhile would do the same) drains and stops the
    server: one line, exit 2, no traceback, no temporary file left."""
    parent = tmp_path / "out"
    parent.mkdir()
    target = parent / ("p" * 250)  # a legal name; `.<name>.<pid>.tmp` beside it is not
    proc = _serve(tmp_path, "--port-file", str(target))
    line = _one_line(proc)
    assert (
        line == f"seqserve serve: cannot write --port-file {target}: File name too long; stopping"
    )
    assert "serving on port" in proc.stderr  # it had started
    assert "spilled 0 sessions" in proc.stderr  # and was drained as a SIGTERM drains it
    assert list(parent.iterdir()) == []


def test_write_json_file_leaves_no_temporary_file_when_it_fails(tmp_path: Path) -> None:
    target = tmp_path / "ports.json"
    target.mkdir()  # the rename over it fails
    with pytest.raises(IsADirectoryError):
        write_json_file(target, "{}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["ports.json"]
    write_json_file(tmp_path / "ok.json", '{"port": 1}\n')
    assert json.loads((tmp_path / "ok.json").read_text()) == {"port": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json", "ports.json"]

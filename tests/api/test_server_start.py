"""Start-up failures are one clear line, not a traceback, and leave nothing half started: a
second server on a taken port (SO_REUSEPORT is off, so it cannot silently share it), and a
spill directory that cannot be written (a read-only tmpfs, mounted by the test as root)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from service.api.listen_check import check_bindable
from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.errors import PortInUse
from service.pb.seqserve.v1 import session_service_pb2 as pb
from tests.tmpfs import mounted_tmpfs

from .conftest import ServerFactory, make_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def _serve(
    store: Path,
    spill: Path | None,
    port: int,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`seqserve serve` (with `extra` flags) expected to fail at start-up (bounded: 60 s);
    without `spill`, the state directory is the default one in the data directory `env`
    names."""
    argv = [
        sys.executable, "-m", "service.cli.main", "serve", "--port", str(port),
        "--metrics-port", "-1", "--http-port", "-1", "--store", str(store),
        *(["--spill-dir", str(spill)] if spill is not None else []), *extra,
    ]  # fmt: skip
    env = {**_without_state_paths(os.environ), "SEQSERVE_REGISTRY_POLL_SECONDS": "0", **(env or {})}
    return subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _without_state_paths(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment less what could name the state directory, so each test names it."""
    named = ("SEQSERVE_DATA_DIR", "XDG_STATE_HOME", "SEQSERVE_SESSIONS__SPILL_DIR")
    return {k: v for k, v in environ.items() if k not in named}


def _one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("seqserve serve:")]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


async def test_a_second_server_on_the_same_port_fails_and_the_first_serves_on(
    server_factory: ServerFactory, store_root: Path, tmp_path: Path
) -> None:
    first = await server_factory()
    second = SeqServeServer(
        make_settings(store_root, tmp_path / "second", server={"port": first.port})
    )
    with pytest.raises(PortInUse, match="in use"):
        await second.start()
    async with SeqServeClient(f"127.0.0.1:{first.port}") as client:
        for _ in range(8):  # new connections all reach the first server
            async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
                stub = client.sessions.__class__(channel)
                reply = await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
                assert reply.session.session_id
    assert len(list(first.engine.sessions)) == 8


async def test_serve_on_a_taken_port_exits_with_one_line(
    server_factory: ServerFactory, store_root: Path, tmp_path: Path
) -> None:
    first = await server_factory()
    done = _serve(store_root, tmp_path / "spill2", first.port)
    _one_line_error(done, "in use", str(first.port))


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (root can write anywhere else, so chmod would prove nothing)."""
    with mounted_tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
        yield mount


@pytest.mark.parametrize("where", ["the directory", "its parent"])
def test_serve_on_a_read_only_spill_dir_exits_with_one_line(
    store_root: Path, read_only_dir: Path, where: str
) -> None:
    spill = read_only_dir if where == "the directory" else read_only_dir / "missing" / "spill"
    done = _serve(store_root, spill, 0)
    _one_line_error(done, "SEQSERVE_SESSIONS__SPILL_DIR", "Read-only file system")


@pytest.mark.parametrize("variable", ["SEQSERVE_DATA_DIR", "XDG_STATE_HOME"])
@pytest.mark.parametrize("where", ["the data directory", "its parent"])
def test_serve_on_a_read_only_data_dir_names_the_variable_that_set_it(
    store_root: Path, read_only_dir: Path, variable: str, where: str
) -> None:
    """No spill directory given: the state directory is `spill/` in the data directory the
    variable names, and the line names that variable (it named SEQSERVE_SESSIONS__SPILL_DIR,
    which the operator never set)."""
    data = read_only_dir if where == "the data directory" else read_only_dir / "missing"
    done = _serve(store_root, None, 0, env={variable: str(data)})
    _one_line_error(done, variable, "Read-only file system")
    assert "SEQSERVE_SESSIONS__SPILL_DIR" not in done.stderr, done.stderr


@pytest.mark.parametrize("given", ["SEQSERVE_DATA_DIR", "--spill-dir"])
def test_serve_workers_on_a_read_only_state_dir_exits_with_one_line(
    store_root: Path, read_only_dir: Path, given: str
) -> None:
    """The supervisor of `--workers` makes the state directory itself: read-only, that was an
    OSError traceback; now the one line, naming what set the directory."""
    if given == "--spill-dir":
        done = _serve(store_root, read_only_dir / "spill", 0, extra=("--workers", "2"))
        _one_line_error(done, "SEQSERVE_SESSIONS__SPILL_DIR", "Read-only file system")
        return
    done = _serve(store_root, None, 0, env={given: str(read_only_dir)}, extra=("--workers", "2"))
    _one_line_error(done, given, "Read-only file system")


@pytest.mark.parametrize("journal", ["a file", "read-only"])
def test_serve_on_a_journal_subdirectory_it_cannot_use_exits_with_one_line(
    store_root: Path, tmp_path: Path, journal: str
) -> None:
    """The state directory is fine, its `journal/` is not: one line naming it, exit 2 (it
    was a traceback from recovery, FileExistsError or PermissionError)."""
    spill = tmp_path / "spill"
    spill.mkdir()
    if journal == "a file":
        (spill / "journal").write_text("not a directory")
        done = _serve(store_root, spill, 0)
        _one_line_error(done, "SEQSERVE_SESSIONS__SPILL_DIR", "journal", "not a directory")
        return
    with mounted_tmpfs(spill / "journal", "size=1m,ro"):
        done = _serve(store_root, spill, 0)
    _one_line_error(done, "SEQSERVE_SESSIONS__SPILL_DIR", "journal", "Read-only file system")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_on_a_taken_metrics_port_exits_with_one_line(
    store_root: Path, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        metrics = busy.getsockname()[1]
        argv = [
            sys.executable, "-m", "service.cli.main", "serve", "--port", "0",
            "--metrics-port", str(metrics), "--http-port", "-1", "--store", str(store_root),
            "--spill-dir", str(tmp_path / "spill"),
        ]  # fmt: skip
        done = subprocess.run(
            argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
        )
    _one_line_error(
        done, f"cannot listen for metrics on 127.0.0.1:{metrics}", "Address already in use",
        "--metrics-port, or -1",
    )  # fmt: skip


def test_a_grpc_address_it_cannot_bind_is_one_line_saying_why(
    store_root: Path, tmp_path: Path
) -> None:
    """A port another program holds, and a host not of this machine: one line with the
    system's reason and the flag to change, and no line of gRPC's own before it (it was
    gRPC's "Failed to add port" line, then a hint that blamed another seqserve for both)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve(store_root, tmp_path / "a", port)
    _one_line_error(done, f"cannot listen on 127.0.0.1:{port}", "Address already in use", "--port")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = _serve(
        store_root, tmp_path / "b", _free_port(), extra=("--host", "10.255.255.1", "--insecure")
    )
    _one_line_error(done, "cannot listen on 10.255.255.1", "--host to an address of this machine")
    assert "add_port" not in done.stderr, done.stderr  # (and --insecure's own warning line)


def test_a_host_whose_first_address_is_not_this_machines_is_served_on_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC binds every address a host name resolves to and serves if one binds (`localhost`
    as ::1 then 127.0.0.1 on a host without IPv6): the check before it tried only the first
    and refused. One address in use is still refused. (The resolver is the one stand-in: this
    machine cannot have its IPv6 turned off for a test.)"""
    port = _free_port()
    real = socket.getaddrinfo

    def resolve(host: str, at: int, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        nowhere = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.255.255.1", at))
        return [nowhere, *real("127.0.0.1", at, *args, **kwargs)]  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    check_bindable("localhost", port)  # 127.0.0.1 binds: no refusal
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(PortInUse, match="Address already in use"):
            check_bindable("localhost", port)


def test_two_endpoints_on_one_port_are_refused_before_start(
    store_root: Path, tmp_path: Path
) -> None:
    port = _free_port()
    done = _serve(store_root, tmp_path / "a", port, extra=("--http-port", str(port)))
    assert done.returncode == 2, done.stderr
    assert f"http_port and port are both {port}" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_a_taken_metrics_port_releases_the_grpc_port(
    store_root: Path, tmp_path: Path
) -> None:
    port = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = make_settings(
            store_root, tmp_path / "a", server={"port": port, "metrics_port": busy.getsockname()[1]}
        )
        with pytest.raises(PortInUse, match="cannot listen for metrics"):
            await SeqServeServer(settings).start()
    again = SeqServeServer(make_settings(store_root, tmp_path / "b", server={"port": port}))
    await again.start()  # the port the failed start bound is free again
    assert again.port == port
    await again.stop()


async def test_the_start_up_line_says_metrics_and_http_off(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.api.server"):
        off = await server_factory()
        on = await server_factory(server={"metrics_port": 0, "http_port": 0})
    lines = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert len(lines) == 2, lines
    assert f":{off.port} " in lines[0] and "metrics off" in lines[0], lines[0]
    assert "HTTP off" in lines[0], lines[0]
    assert f"metrics on 127.0.0.1:{on.metrics_port}" in lines[1], lines[1]
    assert f"HTTP on 127.0.0.1:{on.http_port}" in lines[1], lines[1]

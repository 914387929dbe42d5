"""`seqserve serve --workers N`: N server processes on one port, so one box uses all its cores.

The supervisor (this process; it imports no torch) takes the port's lock — a file every
`seqserve serve` takes for its port, so a second one, with or without `--workers`, refuses to
start — and the same lock for its HTTP port (shared by the workers with SO_REUSEPORT, which
alone would let a second supervisor share it too), then starts N workers: each is
`seqserve serve` with the same flags, bound to the port with SO_REUSEPORT (the kernel
spreads connections over them), its metrics on its own port (`--metrics-port` + its index),
and all of them on the shared state tier: the SQLite file
`state.db` in the state directory (or Redis, if `--state-url` names it). A session called
through another worker's connection is taken over through the tier, exactly.

SIGTERM or SIGINT is passed on to every worker, each drains and writes its sessions, and the
supervisor exits when they have. A worker that dies is started again (not more than
`_RESTARTS` times a minute: then everything stops), but for one that exits with the
configuration-error status before it ever served: starting it again would fail the same way,
so everything stops at once and the supervisor exits with that status. The supervisor's
`--port-file` is written once every worker listens, and again after each restart: it always
names the workers serving. The workers' own port files are in a `seqserve-workers-*`
temporary directory, removed when the supervisor exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.cli.serve_cmd import STARTUP_SIGNALS, write_json_file
from service.errors import InvalidArgument, PortInUse, SpillDirUnusable
from service.libc import libc
from service.sessions.spill_directory import WORKERS_DATABASE
from service.settings import Settings

log = logging.getLogger("service.cli.workers")

_RESTARTS = 5  # per minute, per worker
_CONFIG_ERROR = 2  # `serve`'s status for a usage or configuration error (its one line said why)
_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
_SLACK_S = 15.0  # beyond grace + write timeout, before a worker that will not stop is killed


class PortLock:
    """An exclusive lock on a file named after the port, held while this process lives: every
    `seqserve serve` takes it, so two never share a port by accident (workers of one
    supervisor share it on purpose)."""

    def __init__(self, port: int, directory: Path | None = None, flag: str = "--port") -> None:
        self.path = (directory or Path(tempfile.gettempdir())) / f"seqserve-port-{port}.lock"
        self.port = port
        self.flag = flag  # the option the refusal tells the user to change
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PortInUse(
                f"port {self.port} is in use by another seqserve (pid {holder}; lock "
                f"{self.path}); stop it or choose another {self.flag}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _Worker:
    index: int
    argv: list[str]
    env: dict[str, str]
    port_file: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] | None = None
    served: bool = False  # it has written its port file (it listened, loaded) at least once

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=_ends_with(os.getpid()))
        self.starts = [*(self.starts or []), time.monotonic()][-_RESTARTS:]

    def note_served(self) -> None:
        """Called while it runs and once it has exited: its port file says it served (the
        file outlives it; `start` removes it)."""
        self.served = self.served or self.port_file.exists()

    def too_often(self) -> bool:
        starts = self.starts or []
        return len(starts) >= _RESTARTS and time.monotonic() - starts[0] < 60.0


def _ends_with(supervisor: int) -> Callable[[], None] | None:
    """For the forked worker, before it runs: SIGTERM when the supervisor dies, however it
    dies (SIGKILL, the OOM killer), so no worker serves on unsupervised (Linux's parent-death
    signal); and at once if it is already gone. None where there is no prctl."""
    try:
        prctl = libc().prctl
    except (AttributeError, OSError):
        return None

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != supervisor:  # it died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A bound (not listening) SO_REUSEPORT socket holding the port while the workers run: with
    port 0 it is how the workers learn which port to share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock, int(sock.getsockname()[1])


def run_workers(settings: Settings, argv: list[str], count: int, port_file: Path | None) -> int:
    """Supervise `count` workers until SIGTERM/SIGINT; the exit status. What it holds (the
    ports and their locks, the state directory's lock, the workers' temporary directory) is
    let go on every way out, a start-up signal's `StoppedDuringStartup` included."""
    s = settings.server
    held = contextlib.ExitStack()
    try:
        port, http_port = _hold_ports(held, s.host, s.port, s.http_port)
        _check_metrics_ports(s.metrics_port, count, port, http_port)  # before any worker
        _hold_state_dir(held, settings.sessions.spill_dir, settings.sessions.spill_dir_variable)
        # Its finalizer removes it at exit even if a signal's exception lands before `held` has it.
        work = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="seqserve-workers-")))
        workers = [_worker(settings, argv, i, port, http_port, work) for i in range(count)]
        held.callback(_stop_all, workers, settings)  # first of all (LIFO): then the directory
        serving = _Serving(port_file, s.host, port, http_port, metrics=s.metrics_port >= 0)
        return _supervise(workers, serving)
    finally:
        held.close()


def _check_metrics_ports(metrics_port: int, count: int, port: int, http_port: int) -> None:
    """InvalidArgument unless the workers' metrics ports, `metrics_port` + 0..count-1, are all
    ports and none is the gRPC or HTTP port (bound already: with port 0, the one chosen).
    Workers given a port past 65535 each failed with a setting the operator never gave."""
    if metrics_port <= 0:  # off, or each worker picks a free one
        return
    last = metrics_port + count - 1
    taken = f"--metrics-port {metrics_port} with --workers {count} takes {metrics_port}-{last}"
    if last > 65535:
        raise InvalidArgument(
            f"{taken}, past 65535; choose a --metrics-port <= {65536 - count} or fewer --workers"
        )
    for flag, value in (("--port", port), ("--http-port", http_port)):
        if metrics_port <= value <= last:
            raise InvalidArgument(
                f"{taken}, which includes {flag} {value}; choose a --metrics-port range clear of it"
            )


def _worker(
    settings: Settings, argv: list[str], i: int, port: int, http_port: int, work: Path
) -> _Worker:
    """Worker `i`: `serve` on the shared ports and state tier, its port file in `work`."""
    s, spill = settings.server, settings.sessions.spill_dir
    env = {**os.environ, "SEQSERVE_SERVER__WORKER": str(i)}
    if not settings.sessions.state_url:
        env["SEQSERVE_SESSIONS__STATE_URL"] = f"sqlite:{spill.resolve() / WORKERS_DATABASE}"
    metrics = -1 if s.metrics_port < 0 else (0 if s.metrics_port == 0 else s.metrics_port + i)
    worker_file = work / f"worker-{i}.json"
    child = [sys.executable, "-m", "service.cli.main", *argv, "--port", str(port),
             "--metrics-port", str(metrics), "--http-port", str(http_port),
             "--port-file", str(worker_file)]  # fmt: skip
    return _Worker(i, child, env, worker_file)


def _hold_ports(
    held: contextlib.ExitStack, host: str, port: int, http_port: int
) -> tuple[int, int]:
    """Reserve the port (and the HTTP port, unless -1) and take their locks, each let go by
    `held`; the ports bound (for port 0)."""
    reserved, port = reserve_port(host, port)
    held.callback(reserved.close)
    lock = PortLock(port)
    lock.acquire()
    held.callback(lock.release)
    if http_port < 0:
        return port, -1
    http_reserved, http_port = reserve_port(host, http_port)
    held.callback(http_reserved.close)
    # The HTTP port is shared with SO_REUSEPORT too, so a second supervisor's reservation of
    # it would succeed: the same lock (a port is a port) makes it refuse instead.
    http_lock = PortLock(http_port, flag="--http-port")
    http_lock.acquire()
    held.callback(http_lock.release)
    return port, http_port


def _hold_state_dir(held: contextlib.ExitStack, spill: Path, setting: str) -> None:
    """The state directory is the workers' now: a lone server on it must refuse. One that
    cannot be made (read-only) is one line naming `setting`, what set it, not a traceback."""
    try:
        spill.mkdir(parents=True, exist_ok=True)
        dir_lock = os.open(spill / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SpillDirUnusable.at(spill, exc, setting) from None
    held.callback(os.close, dir_lock)
    try:
        fcntl.flock(dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PortInUse(f"state directory {spill} is in use by another server process") from None


def _supervise(workers: list[_Worker], serving: _Serving) -> int:
    """Start the workers and start them again as they exit, until SIGTERM/SIGINT or one that
    must not be; the exit status. The caller stops them."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("received %s: stopping %d workers", signal.Signals(signum).name, len(workers))
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    STARTUP_SIGNALS.check()  # one that came before, its exception lost: stop before starting
    status = 0
    for w in workers:
        w.start()
    while not stopping:
        try:
            serving.update(workers)
        except OSError as exc:  # its directory went away or filled since `check_port_file`
            print(f"seqserve serve: cannot write --port-file {serving.path}: "
                  f"{exc.strerror or exc}; stopping", file=sys.stderr)  # fmt: skip
            return _CONFIG_ERROR
        time.sleep(0.2 if serving.announced else 0.05)
        failed = None if stopping else _restart_exited(workers)
        if failed is not None:
            stopping, status = True, failed
    return status


class _Serving:
    """The supervisor's "serving" log line and its `--port-file`: written once every worker
    has written its own port file, and again whenever a restarted worker has (its new pid, and
    with `--metrics-port 0` its new metrics port), so the file always names the workers that
    serve. A worker that exits during start-up only delays it: the loop starts it again."""

    def __init__(self, path: Path | None, host: str, port: int, http_port: int, metrics: bool):
        self.path = path
        self.host = host
        self.port = port
        self.http_port = http_port
        self.metrics = metrics
        self.announced: list[tuple[int, int]] | None = None  # (pid, metrics port) per worker

    def update(self, workers: list[_Worker]) -> None:
        serving = _serving(workers)
        if serving is None or serving == self.announced:
            return
        pids, ports = [pid for pid, _ in serving], [m for _, m in serving]
        if self.announced is None:
            log.info("seqserve: %d workers serving on %s:%d (metrics %s)", len(workers),
                     self.host, self.port, f"on {ports}" if self.metrics else "off")  # fmt: skip
        else:
            log.info("seqserve: workers now %s (metrics %s)", pids,
                     f"on {ports}" if self.metrics else "off")  # fmt: skip
        self.announced = serving
        if self.path is not None:
            write_json_file(self.path, json.dumps({
                "port": self.port, "metrics_port": ports[0], "http_port": self.http_port,
                "workers": pids, "metrics_ports": ports}) + "\n")  # fmt: skip


def _serving(workers: list[_Worker]) -> list[tuple[int, int]] | None:
    """Each worker's (pid, metrics port) once every running worker has written its port file
    (a restarted one removes its predecessor's first); None while one has not."""
    serving = []
    for w in workers:
        if w.proc is None or w.proc.poll() is not None:
            return None
        try:
            metrics_port = int(json.loads(w.port_file.read_text())["metrics_port"])
        except FileNotFoundError:
            return None
        serving.append((w.proc.pid, metrics_port))
    return serving


def _restart_exited(workers: list[_Worker]) -> int | None:
    """Start again each worker that has exited; the supervisor's exit status if one must not
    be (then all stop): 1 if it keeps exiting, the configuration-error status if it exited
    so before it ever served (its settings, or the store, make every start fail alike)."""
    for w in workers:
        assert w.proc is not None
        code = w.proc.poll()
        w.note_served()
        if code is None:
            continue
        if code == _CONFIG_ERROR and not w.served:
            log.error("worker %d could not start (status %d, its error above): stopping",
                      w.index, code)  # fmt: skip
            return code
        if w.too_often():
            log.error("worker %d keeps exiting (status %d): stopping", w.index, code)
            return 1
        log.error("worker %d exited with status %d: starting it again", w.index, code)
        w.start()
    return None


def _stop_all(workers: list[_Worker], settings: Settings) -> None:
    for w in workers:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    limit = settings.server.grace_seconds + settings.sessions.write_timeout_seconds + _SLACK_S
    deadline = time.monotonic() + limit
    for w in workers:
        if w.proc is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        if w.proc.poll() is None:
            log.error("worker %d did not stop in %.0f s: killing it", w.index, limit)
            w.proc.kill()
            w.proc.wait()

"""SIGTERM or SIGINT while a real `seqserve serve` starts up, before the server has installed
its own handlers: one line, status 0 (as a drain ends), no traceback, no signal death.

Start-up is held at a known point by a named pipe the process must read: the `--config` file
(before the event loop runs: settings are loading) or a model's `aliases.json` (on the loop:
the server listens and is loading its models). The test holds the pipe's writing end open, so
the server is blocked there until after the signal.

Python runs a signal handler wherever the main thread is; in a weakref callback (importlib runs
one on every import) the handler's exception is lost. The signal must still stop start-up:
`lose_a_sigterm` puts a handler's run there at a chosen point, in-process or in a real
`seqserve serve` (`_serve_patched`)."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

from service.cli.serve_cmd import StartupSignals

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration
STOP_TIMEOUT_S = 60.0


def lose_a_sigterm() -> None:
    """SIGTERM, its handler run inside a weakref callback: the exception it raises is lost
    (Python prints it as "Exception ignored" and goes on). Also run in `_serve_patched`'s
    processes, from its source."""

    class Referent:
        pass

    referent = Referent()
    ref = weakref.ref(referent, lambda _ref: signal.raise_signal(signal.SIGTERM))
    del referent  # the callback runs here
    del ref


def _serve(tmp_path: Path, *flags: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env["SEQSERVE_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve", "--port", "0", "--metrics-port",
         "-1", "--http-port", "-1", "--spill-dir", str(tmp_path / "spill"), *flags],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _serve_patched(tmp_path: Path, patch: str, *flags: str) -> subprocess.Popen[str]:
    """`seqserve serve` as the console script runs it, after `patch` (Python, with
    `lose_a_sigterm` defined) has run in the process."""
    script = "\n".join([
        "import signal, weakref", inspect.getsource(lose_a_sigterm), textwrap.dedent(patch),
        "from service.cli import main", "main.run()",
    ])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env["SEQSERVE_DATA_DIR"] = str(tmp_path / "data")
    env["TMPDIR"] = str(tmp_path)
    return subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--port", "0", "--metrics-port", "-1",
         "--http-port", "-1", "--spill-dir", str(tmp_path / "spill"),
         "--store", str(REPO_ROOT / "model_store"), *flags],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stderr_once_exited(proc: subprocess.Popen[str]) -> str:
    """Its stderr once it has exited by itself (one that serves on instead is killed: the
    signal was lost)."""
    try:
        _, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(
            f"still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: {stderr}"
        ) from None
    return stderr


def _stop_while_reading(proc: subprocess.Popen[str], pipe: Path, sig: int) -> str:
    """Send `sig` once `proc` has opened `pipe` to read it (it is blocked there), then let the
    read end; `proc`'s stderr once it has exited."""
    writer = os.open(pipe, os.O_WRONLY)  # returns once the server opened it for reading
    try:
        os.kill(proc.pid, sig)
    finally:
        os.close(writer)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_settings_load_stops_it_with_one_line(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = tmp_path / "seqserve.toml"
    os.mkfifo(config)
    proc = _serve(tmp_path, "--config", str(config), "--store", str(REPO_ROOT / "model_store"))
    stderr = _stop_while_reading(proc, config, sig)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip() == f"seqserve serve: received {sig.name}: stopping during start-up"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_models_load_stops_it_with_one_line(
    tmp_path: Path, sig: signal.Signals
) -> None:
    store = tmp_path / "store"
    shutil.copytree(REPO_ROOT / "model_store", store)
    aliases = store / "co2-gru" / "aliases.json"
    aliases.unlink()
    os.mkfifo(aliases)  # read by the preload, once the server listens
    proc = _serve(tmp_path, "--store", str(store), "--log-level", "info")
    stderr = _stop_while_reading(proc, aliases, sig)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "listening on" in stderr and "serving on" not in stderr, stderr  # during start-up
    assert f"seqserve serve: received {sig.name}: stopping during start-up" in stderr, stderr


def test_a_signal_whose_exception_was_lost_lets_the_next_one_stop_start_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: the first SIGTERM had set `signum`, so the second returned early too."""
    reached: list[str] = []

    def start_up() -> int:
        lose_a_sigterm()
        reached.append("after the first SIGTERM")
        signal.raise_signal(signal.SIGTERM)
        reached.append("after the second SIGTERM")
        return 1

    assert StartupSignals().guard(start_up) == 0
    assert reached == ["after the first SIGTERM"]
    stderr = capsys.readouterr().err
    assert stderr.strip() == "seqserve serve: received SIGTERM: stopping during start-up"


def test_a_signal_lost_before_the_event_loop_stops_it_before_it_listens(tmp_path: Path) -> None:
    """The only SIGTERM is lost just before the loop runs: `serve` is never awaited. Before:
    the server served on."""
    proc = _serve_patched(
        tmp_path,
        """
        import service.api.event_loop as event_loop

        real_run = event_loop.run

        def run(main):
            lose_a_sigterm()
            return real_run(main)

        event_loop.run = run
        """,
    )
    stderr = _stderr_once_exited(proc)
    assert proc.returncode == 0, stderr
    assert stderr.strip() == "seqserve serve: received SIGTERM: stopping during start-up"


def test_a_signal_whose_cancel_was_swallowed_drains_the_server_once_started(
    tmp_path: Path,
) -> None:
    """On the loop the SIGTERM cancels the start-up task, and start-up code swallows the
    cancel: once started, the server drains as its own handlers would. Before: it served on."""
    proc = _serve_patched(
        tmp_path,
        """
        import asyncio
        import signal

        from service.api.server import SeqServeServer

        real_open = SeqServeServer.open

        async def open_(self):
            signal.raise_signal(signal.SIGTERM)  # the handler cancels the start-up task
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:  # swallowed on the way, as a library might
                pass
            await real_open(self)

        SeqServeServer.open = open_
        """,
        "--log-level", "info",
    )  # fmt: skip
    stderr = _stderr_once_exited(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "received SIGTERM: draining" in stderr, stderr


def test_a_signal_lost_before_the_supervisor_took_them_over_stops_it(tmp_path: Path) -> None:
    """`--workers`: the SIGTERM is lost just before the supervisor installs its handlers: it
    starts no worker and lets go of all it held. Before: it supervised its workers on."""
    proc = _serve_patched(
        tmp_path,
        """
        import service.cli.workers as workers

        real_supervise = workers._supervise

        def supervise(*args):
            lose_a_sigterm()
            return real_supervise(*args)

        workers._supervise = supervise
        """,
        "--workers", "1",
    )  # fmt: skip
    stderr = _stderr_once_exited(proc)
    assert proc.returncode == 0, stderr
    assert stderr.strip() == "seqserve serve: received SIGTERM: stopping during start-up"
    assert not list(tmp_path.glob("seqserve-workers-*"))  # TMPDIR is tmp_path

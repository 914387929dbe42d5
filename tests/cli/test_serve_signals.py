"""SIGTERM or SIGINT while a real `seqserve serve` starts up, before the server has installed
its own handlers: one line, status 0 (as a drain ends), no traceback, no signal death.

Start-up is held at a known point by a named pipe the process must read: the `--config` file
(before the event loop runs: settings are loading) or a model's `aliases.json` (on the loop:
the server listens and is loading its models). The test holds the pipe's writing end open, so
the server is blocked there until after the signal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _serve(tmp_path: Path, *flags: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env["SEQSERVE_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve", "--port", "0", "--metrics-port",
         "-1", "--http-port", "-1", "--spill-dir", str(tmp_path / "spill"), *flags],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


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

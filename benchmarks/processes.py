"""Servers under test as subprocesses (their own interpreter and GIL), optionally pinned to
CPUs, and the server's Prometheus endpoint read back.

Ports: the servers bind port 0 and write the ports they got to `--port-file` (JSON) once they
listen; probing for a free port first would race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# Runs in the child: pin itself, then become the real command (no preexec_fn with threads).
_PIN_AND_EXEC = (
    "import os, sys; "
    "os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


@dataclass
class ServerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int  # -1 when it has no metrics endpoint
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all its threads), from /proc."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    cpus: Sequence[int] | None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start `python argv... --port-file F` (pinned to `cpus` if given), wait for F.

    The log goes to `workdir/NAME.log`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file, log_path = workdir / f"{name}.ports.json", workdir / f"{name}.log"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, *argv, "--port-file", str(port_file)]
    if cpus:
        cmd = [sys.executable, "-c", _PIN_AND_EXEC, ",".join(map(str, cpus)), *cmd]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():  # written atomically once the server listens
            ports = json.loads(port_file.read_text())
            metrics = int(ports.get("metrics_port", -1))
            return ServerProcess(name, proc, int(ports["port"]), metrics, log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{name} did not come up (exit {proc.returncode}); log tail:\n{tail}")


# Never route these local scrapes through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# A sample's name and its labels, sorted.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def scrape_samples(metrics_port: int) -> dict[SampleKey, float]:
    """Every sample on the server's metrics endpoint, by name and labels."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with _OPENER.open(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(metrics_port: int) -> dict[str, float]:
    """Every sample on the server's metrics endpoint, summed over labels, by sample name."""
    totals: dict[str, float] = {}
    for (name, _), value in scrape_samples(metrics_port).items():
        totals[name] = totals.get(name, 0.0) + value
    return totals


def state_writes(metrics_port: int) -> tuple[float, float]:
    """The state tier's writes so far and their wall seconds (`seqserve_state_writes_total`,
    `seqserve_state_write_seconds_total`)."""
    found = scrape(metrics_port)
    return (
        found.get("seqserve_state_writes_total", 0.0),
        found.get("seqserve_state_write_seconds_total", 0.0),
    )


def mean_write_us(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """Mean µs of the writes between two readings of `state_writes` (None: there were none)."""
    count = after[0] - before[0]
    return (after[1] - before[1]) / count * 1e6 if count else None

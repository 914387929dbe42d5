"""A real Prometheus server for tests, on 127.0.0.1, in a temporary directory.

Prometheus cannot bind port 0 and report the port back, and probing for a free port then
closing it races with everything else on the machine. So: pick a port from a range, start
Prometheus on it, and if it dies with "address already in use" try the next one — a bounded
number of times, each with a bounded wait for `/-/ready`.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = "install it with .ci/install-system-deps.sh (Debian package `prometheus`)"
PORT_RANGE = (20000, 32000)  # below the usual Linux ephemeral range (32768+)


def random_ports(low: int = PORT_RANGE[0], high: int = PORT_RANGE[1]) -> Iterator[int]:
    """Endless random ports in [low, high): parallel test runs rarely pick the same one."""
    while True:
        yield random.randrange(low, high)


@dataclass
class PrometheusServer:
    """A running Prometheus process; `stop()` ends it."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        """GET an HTTP API path (e.g. `/api/v1/query`); returns `data`, raises on an error."""
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
            try:
                body = json.load(exc)
            except ValueError:
                raise PrometheusQueryError(f"{path}: HTTP {exc.code}") from exc
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the vector result (each item has `metric` and `value`)."""
        data = self.api("/api/v1/query", query=promql)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for_query(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout_s: float = 30.0,
        poll_s: float = 0.2,
    ) -> list[dict[str, Any]]:
        """Poll `promql` until `predicate(result)` holds; fail with the last result if not."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(poll_s)
        raise AssertionError(
            f"{promql!r} did not satisfy the condition within {timeout_s}s; "
            f"last result: {result}\n--- prometheus log tail ---\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class PrometheusQueryError(RuntimeError):
    """The HTTP API answered with status `error` (bad PromQL, bad parameters)."""


def write_config(
    path: Path,
    targets: Sequence[str],
    *,
    job: str,
    scrape_interval_s: float,
    self_target: str | None,
    rule_files: Sequence[Path],
) -> None:
    """Prometheus reads YAML, and JSON is YAML: no YAML library needed to write it."""
    interval = f"{int(scrape_interval_s * 1000)}ms"
    scrape_configs: list[dict[str, Any]] = []
    if targets:
        scrape_configs.append({"job_name": job, "static_configs": [{"targets": list(targets)}]})
    if self_target is not None:
        scrape_configs.append(
            {"job_name": "prometheus", "static_configs": [{"targets": [self_target]}]}
        )
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": scrape_configs,
    }
    path.write_text(json.dumps(config, indent=2))


def start_prometheus(
    workdir: Path,
    targets: Sequence[str] = (),
    *,
    job: str = "seqserve",
    scrape_interval_s: float = 1.0,
    scrape_self: bool = False,
    rule_files: Sequence[Path] = (),
    ports: Iterable[int] | None = None,
    attempts: int = 8,
    ready_timeout_s: float = 30.0,
) -> PrometheusServer:
    """Start Prometheus scraping `targets` (host:port) as `job`; return it once ready.

    `scrape_self` adds a `prometheus` job scraping its own /metrics (the port is only known
    once chosen, so the config is written per attempt). `ports` overrides the candidate ports.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError(f"`prometheus` binary not found on PATH; {INSTALL_HINT}")
    candidates = iter(ports if ports is not None else random_ports())
    workdir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for attempt in range(attempts):
        port = next(candidates)
        address = f"127.0.0.1:{port}"
        config_path = workdir / f"prometheus-{attempt}.yml"
        write_config(
            config_path,
            targets,
            job=job,
            scrape_interval_s=scrape_interval_s,
            self_target=address if scrape_self else None,
            rule_files=rule_files,
        )
        log_path = workdir / f"prometheus-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                    f"--web.listen-address={address}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = PrometheusServer(process, port, workdir, log_path)
        if _wait_ready(server, config_path, ready_timeout_s):
            return server
        server.stop()
        tail = server.log_tail()
        if "address already in use" not in tail:
            raise RuntimeError(f"prometheus failed to start on {address}:\n{tail}")
        failures.append(address)
    raise RuntimeError(f"prometheus: every port tried was in use: {failures}")


def _wait_ready(server: PrometheusServer, config_path: Path, timeout_s: float) -> bool:
    """True once *this* process answers /-/ready; False if it exits or time runs out.

    Checking the config path guards against a race: another Prometheus already on the port
    would answer /-/ready while ours is still on its way to "address already in use".
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{server.base_url}/-/ready", timeout=1) as response:
                ready = response.status == 200
            if ready and server.api("/api/v1/status/flags")["config.file"] == str(config_path):
                return True
        except (
            urllib.error.URLError,
            ConnectionError,
            TimeoutError,
            ValueError,  # a non-Prometheus listener answering garbage
            PrometheusQueryError,
        ):
            pass  # not listening yet, or still opening the TSDB (503)
        time.sleep(0.1)
    return False

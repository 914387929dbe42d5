"""A real `seqserve serve` on the bundled store (`model_store/`) as a subprocess, for the tests
that run the README's examples as written."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.polling import until_sync

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_STORE = REPO_ROOT / "model_store"


@contextlib.contextmanager
def bundled_server(work: Path, *flags: str, timeout: float = 90.0) -> Iterator[dict[str, int]]:
    """Serve the bundled store until the block ends; yields the ports it wrote (`port`,
    `metrics_port`, `http_port`). `flags` go after the defaults (port 0, no metrics, no HTTP),
    so they override them."""
    work.mkdir(parents=True, exist_ok=True)
    port_file, log_path = work / "ports.json", work / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--port", "0",
             "--metrics-port", "-1", "--http-port", "-1", "--store", str(BUNDLED_STORE),
             "--spill-dir", str(work / "spill"), "--port-file", str(port_file), *flags],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def started() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return port_file.exists()

        try:
            until_sync(started, timeout, "the server to start (its port file)", interval=0.05)
            yield json.loads(port_file.read_text())
        finally:
            proc.terminate()
            proc.wait(30)

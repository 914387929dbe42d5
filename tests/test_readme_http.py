"""The README's HTTP examples run as written: each `sh` block after a `<!-- test: http -->`
marker runs in bash (`-euo pipefail`) against a real `seqserve serve` on the bundled store. The
only change is the port: `localhost:8080` becomes the server's (8080 may be taken here). curl
gets `--fail-with-body` from a `.curlrc`, so an HTTP error fails the block."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bundled_server import bundled_server

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- test: http -->"


def http_blocks(readme: str) -> list[str]:
    return re.findall(re.escape(MARKER) + r"\s*```sh\n(.*?)```", readme, flags=re.S)


@pytest.fixture
def http_port(tmp_path: Path) -> Iterator[int]:
    with bundled_server(tmp_path / "server", "--http-port", "0") as ports:
        yield ports["http_port"]


def test_the_readme_has_http_examples() -> None:
    blocks = http_blocks((REPO_ROOT / "README.md").read_text())
    assert len(blocks) == 1 and "curl" in blocks[0]


def test_the_curl_examples_run_as_written(http_port: int, tmp_path: Path) -> None:
    assert shutil.which("curl"), "curl is missing"
    (tmp_path / ".curlrc").write_text("fail-with-body\n")
    (block,) = http_blocks((REPO_ROOT / "README.md").read_text())
    script = block.replace("localhost:8080", f"localhost:{http_port}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                          "CURL_HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '"name": "bytes-lstm"' in out and '"name": "co2-gru"' in out
    assert '"position": "20"' in out  # the step after a 17-byte prefix and 3 more bytes
    assert out.count("event: token") == 8 and "FINISH_REASON_MAX_TOKENS" in out
    assert out.count("SESSION_STATE_CLOSED") == 3
    values = re.search(r'"regression": \{"values": \[([0-9.]+)\]', out)
    assert values is not None and 360 < float(values.group(1)) < 380  # next week's ppm

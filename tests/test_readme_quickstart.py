"""The README's Quickstart shell commands run as written and print what it shows.

Each ```console block of the Quickstart (before its "Installing from a wheel" part, which
`tests/install/test_wheel.py` covers) is read as `$ command` lines (with `\\` continuations),
each followed by the output the README shows. `make serve` is this test's own server: a
`seqserve serve` on the bundled store at the default address, 127.0.0.1:50051 (if that port is
taken here, the commands get `--target` to the test server's port instead). Every other command
runs in bash from the repository root and must exit 0 and print the README's output, where
`…` stands for text the README leaves out (and long floats are compared to 4 decimals)."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bundled_server import bundled_server

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 50051


def quickstart_commands(readme: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs of the Quickstart's console blocks."""
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    section = section.split("### Installing from a wheel", 1)[0]
    pairs: list[tuple[str, str]] = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                i += 1
                continue
            command = lines[i][2:]
            while command.rstrip().endswith("\\"):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            pairs.append((command, "\n".join(output)))
    return pairs


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def grpc_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else 0
    with bundled_server(tmp_path_factory.mktemp("quickstart"), "--port", str(port)) as ports:
        yield ports["port"]


_LONG_FLOAT = re.compile(r"(-?\d+\.\d{4})\d+")


def _literal(text: str) -> str:
    """`text` as a pattern; a float shown with more than 4 decimals matches to 4 (float32 sums
    differ in the last digits between kernels and machines)."""
    out, last = [], 0
    for m in _LONG_FLOAT.finditer(text):
        out += [re.escape(text[last : m.start()]), re.escape(m.group(1)) + r"\d*"]
        last = m.end()
    return "".join([*out, re.escape(text[last:])])


def _expected(shown: str) -> re.Pattern[str]:
    """The README's output as a pattern: `…` is any text; the rest is literal (floats to 4
    decimals)."""
    parts = [_literal(p) for p in shown.strip().split("…")]
    return re.compile(".*?".join(parts), flags=re.S)


COMMANDS = quickstart_commands((REPO_ROOT / "README.md").read_text())


def test_the_quickstart_has_its_commands() -> None:
    commands = [c for c, _ in COMMANDS]
    assert commands[0].startswith("make serve")
    assert any("seqserve generate" in c for c in commands)
    assert sum("seqserve predict" in c for c in commands) == 2


@pytest.mark.parametrize(
    ("command", "shown"), [p for p in COMMANDS if not p[0].startswith("make serve")],
    ids=lambda v: v[:40] if isinstance(v, str) else str(v),
)  # fmt: skip
def test_a_quickstart_command_runs_as_written(grpc_port: int, command: str, shown: str) -> None:
    if grpc_port != DEFAULT_PORT and "seqserve generate" in command:
        command = command.replace("generate", f"generate --target 127.0.0.1:{grpc_port}", 1)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    if shown.strip():
        out = "\n".join(line.rstrip() for line in done.stdout.strip().splitlines())
        want = "\n".join(line.rstrip() for line in shown.strip().splitlines())
        assert _expected(want).fullmatch(out), f"README shows:\n{want}\n\nran:\n{out}"

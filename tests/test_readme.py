"""The README's Python examples run as written.

Every ```python block in README.md is preceded by one of two markers (an HTML comment, so it
does not show when the README is rendered):

- `<!-- test: run; expect: REGEX -->`: a complete script. It is saved to a file and run with
  this Python against a real `seqserve serve` on the bundled store (`model_store/`); it must
  exit 0 and its output must match REGEX (`re.search`, MULTILINE and DOTALL). The only change
  made to it is the address: `127.0.0.1:50051` becomes the test server's.
- `<!-- test: fragment -->`: a piece of a program (the raw-stub walk-throughs use `await` at the
  top level); it is compiled (top-level await allowed), not run.

A block with neither marker fails `test_every_python_block_is_marked`, so a new example has to
say which it is. Shell blocks are not run here (`tests/test_readme_http.py` runs the HTTP ones).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bundled_server import bundled_server

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
ADDRESS = "127.0.0.1:50051"
_BLOCK = re.compile(r"(?:<!-- test: (?P<marker>[^\n]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    line: int  # where the block's code starts in the README (1-based)
    marker: str | None  # "run; expect: ...", "fragment", or None
    code: str

    @property
    def expect(self) -> str:
        match = re.fullmatch(r"run; expect: (.+)", self.marker or "")
        assert match, f"README line {self.line}: a run marker needs `; expect: REGEX`"
        return match.group(1)


def python_blocks(text: str) -> list[Block]:
    return [
        Block(text.count("\n", 0, m.start("code")) + 1, m.group("marker"), m.group("code"))
        for m in _BLOCK.finditer(text)
    ]


BLOCKS = python_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if (b.marker or "").startswith("run")]


def test_every_python_block_is_marked() -> None:
    assert len(BLOCKS) == README.read_text().count("```python")
    for block in BLOCKS:
        assert block.marker == "fragment" or (block.marker or "").startswith("run"), (
            f"README line {block.line}: mark the block `<!-- test: run; expect: ... -->` or "
            "`<!-- test: fragment -->`"
        )
    # The quickstart's snippet and the client examples (models, co2 frames, errors) run.
    assert len(RUNNABLE) >= 4
    assert any("co2-gru" in b.code for b in RUNNABLE)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker == "fragment"], ids=str)
def test_fragments_compile(block: Block) -> None:
    compile(block.code, f"README.md:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_runnable_blocks_are_whole_scripts() -> None:
    for block in RUNNABLE:
        tree = ast.parse(block.code)  # no top-level await: it would not parse
        assert "asyncio.run(main())" in block.code, f"README line {block.line}"
        assert ADDRESS in block.code, f"README line {block.line}: use {ADDRESS}"
        assert tree.body, block.line


@pytest.fixture(scope="module")
def grpc_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `seqserve serve` on the bundled store, on a free port."""
    with bundled_server(tmp_path_factory.mktemp("readme-server")) as ports:
        yield f"127.0.0.1:{ports['port']}"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"line{b.line}")
def test_runnable_blocks_run_as_written(block: Block, grpc_target: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.code.replace(ADDRESS, grpc_target))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("SEQSERVE_TOKEN", None)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, f"README line {block.line}:\n{done.stdout}{done.stderr}"
    assert re.search(block.expect, done.stdout, flags=re.M | re.S), (
        f"README line {block.line}: output does not match {block.expect!r}:\n{done.stdout}"
    )


def test_the_reason_table_lists_every_reason_the_server_sends() -> None:
    from service.errors import REASONS

    text = README.read_text()
    table = text.split("| reason | status | client exception | when |", 1)[1].split("\n\n", 1)[0]
    listed = dict(re.findall(r"^\| `([A-Z_]+)` \| ([A-Z_]+) \|", table, flags=re.M))
    assert listed == {reason: code.name for reason, code in REASONS.items()}

"""ParsedFiles: a store file is parsed again exactly when it may have changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from service.registry.parsed_files import SETTLE_NS, ParsedFiles


class Parser:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> str:
        self.calls += 1
        text = path.read_text()
        if text.startswith("bad"):
            raise ValueError(f"{path.name}: {text}")
        return text


def _write(path: Path, text: str, age_s: float, mtime_ns: int | None = None) -> int:
    path.write_text(text)
    then = mtime_ns if mtime_ns is not None else time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(then, then))
    return then


def test_an_unchanged_settled_file_is_parsed_once(tmp_path: Path) -> None:
    path, parse = tmp_path / "m.json", Parser()
    _write(path, "one", age_s=10)
    files = ParsedFiles(parse)
    assert [files.get(path) for _ in range(3)] == ["one"] * 3
    assert parse.calls == 1


def test_a_changed_file_is_parsed_again_even_at_the_same_size(tmp_path: Path) -> None:
    path, parse = tmp_path / "m.json", Parser()
    _write(path, "one", age_s=10)
    files = ParsedFiles(parse)
    assert files.get(path) == "one"
    mtime = _write(path, "two", age_s=5)  # rewritten in place: same inode and size
    assert files.get(path) == "two"
    tmp = tmp_path / ".tmp"
    _write(tmp, "six", age_s=0, mtime_ns=mtime)
    os.replace(tmp, path)  # replaced atomically: same size and mtime, another inode
    assert files.get(path) == "six"
    assert parse.calls == 3


def test_a_file_changed_within_the_settling_time_is_never_kept(tmp_path: Path) -> None:
    """Its mtime could stay the same through a rewrite in the same clock tick."""
    path, parse = tmp_path / "m.json", Parser()
    _write(path, "one", age_s=SETTLE_NS / 1e9 / 4)
    files = ParsedFiles(parse)
    files.get(path)
    files.get(path)
    assert parse.calls == 2


def test_errors_are_kept_like_results_and_missing_files_are_not(tmp_path: Path) -> None:
    path, parse = tmp_path / "m.json", Parser()
    _write(path, "bad json", age_s=10)
    files = ParsedFiles(parse)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"m\.json: bad json"):
            files.get(path)
    assert parse.calls == 1
    path.unlink()
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            files.get(path)
    assert parse.calls == 3


def test_the_oldest_used_entries_go_past_the_limit(tmp_path: Path) -> None:
    parse = Parser()
    files = ParsedFiles(parse, limit=2)
    paths = [tmp_path / f"{i}.json" for i in range(3)]
    for i, path in enumerate(paths):
        _write(path, f"v{i}", age_s=10)
        files.get(path)
    files.get(paths[2])
    files.get(paths[0])  # dropped when the third came in
    assert parse.calls == 4

"""A real small filesystem for the fault tests: a tmpfs mounted for one test (root only; the
test is skipped otherwise), and ways to take every free byte of it, or all but a few."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs with mount `options` (e.g. "size=1m,ro") at the new directory `where`."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; returns the filler file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def fill_but(disk: Path, room: int) -> Path:
    """Take every free byte of the disk but about `room`; returns the filler file."""
    filler = fill(disk)
    os.truncate(filler, filler.stat().st_size - room)
    return filler

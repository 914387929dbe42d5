"""The state directory's write probe: random bytes written, fsynced and removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.sessions.write_probe import MAX_PROBE_BYTES, PROBE_BYTES, takes_writes
from tests.tmpfs import fill, fill_but, mounted_tmpfs


def test_a_directory_with_room_takes_the_probe_and_keeps_nothing_of_it(tmp_path: Path) -> None:
    assert takes_writes(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_and_a_missing_directory_do_not(tmp_path: Path) -> None:
    assert not takes_writes(tmp_path / "missing")
    with mounted_tmpfs(tmp_path / "disk", "size=1m") as disk:
        filler = fill(disk)
        assert not takes_writes(disk)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no probe file left
        filler.unlink()
        assert takes_writes(disk)


def test_the_probe_writes_bytes_a_filesystem_cannot_store_as_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of zeros can be stored as a hole (or compressed to nothing) by a filesystem that
    is full, which would then pass the probe. No such filesystem here (tmpfs allocates zero
    pages), so this looks at what the probe hands to write(2): random, not zeros, and
    different at each probe (a deduplicating filesystem stores a repeat once)."""
    written: list[bytes] = []
    write = os.write

    def recording(fd: int, data: bytes) -> int:
        written.append(bytes(data))
        return write(fd, data)

    monkeypatch.setattr(os, "write", recording)
    assert takes_writes(tmp_path) and takes_writes(tmp_path)
    assert [len(w) for w in written] == [PROBE_BYTES, PROBE_BYTES]
    assert all(w.count(0) < PROBE_BYTES // 16 for w in written)  # random: ~1/256 zero bytes
    assert written[0] != written[1]


def test_the_probe_asks_for_the_room_it_is_told_to_within_bounds(tmp_path: Path) -> None:
    """A disk with two pages free takes a page's probe but not one of 64 KiB (the size of a
    batch the journal could not write); a probe asks at least a page, at most 1 MiB."""
    with mounted_tmpfs(tmp_path / "disk", "size=2m") as disk:
        filler = fill_but(disk, 2 * PROBE_BYTES)
        assert takes_writes(disk, 0) and takes_writes(disk)
        assert not takes_writes(disk, 64 * 1024)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
        filler.unlink()
        assert takes_writes(disk, 64 * 1024)
        assert takes_writes(disk, 100 * MAX_PROBE_BYTES)  # asks 1 MiB of the 2 free, not 100

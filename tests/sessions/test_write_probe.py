"""The state directory's write probe: a page written, fsynced and removed."""

from __future__ import annotations

from pathlib import Path

from service.sessions.write_probe import takes_writes
from tests.tmpfs import fill, mounted_tmpfs


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

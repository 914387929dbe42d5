"""benchmarks.filesystem: which filesystem holds a directory, and whether it keeps a journal."""

from __future__ import annotations

from pathlib import Path

from benchmarks.filesystem import Filesystem, describe, state_filesystem

MOUNTS = """\
/dev/vda / ext4 rw,relatime,discard 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
/dev/vdb /srv/state ext4 rw,relatime 0 0
/dev/vdc /srv/state\\040two xfs rw,relatime 0 0
/dev/vdd /srv/state ext4 rw,relatime 0 0
"""


def _proc(tmp_path: Path, journals: list[str]) -> tuple[Path, Path]:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    jbd2 = tmp_path / "jbd2"
    jbd2.mkdir()
    for name in journals:
        (jbd2 / name).mkdir()
    return mounts, jbd2


def test_the_longest_mount_point_over_the_path_is_its_filesystem(tmp_path: Path) -> None:
    mounts, jbd2 = _proc(tmp_path, ["vda-8", "vdd-8"])
    root = describe(Path("/var/tmp/x"), mounts, jbd2)
    assert root == Filesystem("/", "ext4", "/dev/vda", True)
    shm = describe(Path("/dev/shm/seqserve"), mounts, jbd2)
    assert shm == Filesystem("/dev/shm", "tmpfs", "tmpfs", None)  # no journal to speak of
    # The later of two mounts on one point hides the first; a point's escaped space is read.
    assert describe(Path("/srv/state/spill"), mounts, jbd2) == Filesystem(
        "/srv/state", "ext4", "/dev/vdd", True
    )
    two = describe(Path("/srv/state two/a"), mounts, jbd2)
    assert two is not None and (two.mount_point, two.fs_type) == ("/srv/state two", "xfs")
    # A point is a whole path component: /srv/statefoo is not under /srv/state.
    other = describe(Path("/srv/statefoo"), mounts, jbd2)
    assert other is not None and other.mount_point == "/"


def test_an_ext4_device_without_a_jbd2_entry_has_no_journal(tmp_path: Path) -> None:
    mounts, jbd2 = _proc(tmp_path, ["vdd-8", "dm-0-8"])  # vda's is missing
    bare = describe(Path("/tmp"), mounts, jbd2)
    assert bare is not None and bare.journal is False
    assert "without a journal" in bare.summary() and "1–6 minutes" in bare.summary()
    assert "with a journal" in Filesystem("/", "ext4", "/dev/vdd", True).summary()
    assert "journal" not in Filesystem("/x", "xfs", "/dev/vdc", None).summary()


def test_what_cannot_be_read_is_unknown_not_an_error(tmp_path: Path) -> None:
    assert describe(Path("/tmp"), tmp_path / "no-mounts", tmp_path) is None
    mounts, _ = _proc(tmp_path, [])
    unknown = describe(Path("/tmp"), mounts, tmp_path / "no-jbd2")  # no /proc/fs/jbd2
    assert unknown is not None and unknown.journal is None


def test_this_machine_names_the_filesystem_of_a_real_directory(tmp_path: Path) -> None:
    found = describe(tmp_path)  # /proc/self/mounts of the machine running the tests
    assert found is not None and found.fs_type and tmp_path.as_posix().startswith(found.mount_point)
    assert state_filesystem(tmp_path) == found.summary()

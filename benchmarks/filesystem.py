"""Which filesystem holds a directory, and whether it keeps a journal: the benchmarks print it
beside every figure that creates files, because what a new file costs depends on it.

On ext4 without a journal, the kernel's inode allocator passes over every free inode deleted
in the last 60 s (360 s while its inode-table block is still dirty) before it takes one
(`find_inode_bit` → `recently_deleted` in `fs/ext4/ialloc.c`, checked only when the filesystem
has no journal). Each inode passed over is a buffer-cache lookup, so a new file costs more the
more files anyone deleted on that filesystem in the last minutes. This VM's root filesystem is
such an ext4 (`/proc/fs/jbd2` has no entry for its device): `perf record` of a loop creating,
writing and renaming 20,000 files in a fresh directory there put ~80% of its time in that scan
(`find_get_block_common`, `recently_deleted`, `ext4_get_group_desc`), at 290–820 µs a file from
run to run, against 40–60 µs in quieter minutes. ext4 with a journal, XFS and tmpfs do not scan.
Every session's first checkpoint is a new file (an idle checkpoint, a spill), so the churn
figures move with it; a run straight after another run's clean-up reads low.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")  # how the mount table writes a space, a tab, a newline
# Filesystems whose journal, when they have one, is kept by jbd2 (named in /proc/fs/jbd2).
_JBD2 = ("ext3", "ext4")


@dataclass(frozen=True)
class Filesystem:
    mount_point: str
    fs_type: str
    source: str
    journal: bool | None  # None: not an ext3/ext4 filesystem, or not knowable here

    def summary(self) -> str:
        what = f"{self.fs_type} on {self.source} at {self.mount_point}"
        if self.journal is False:
            return (
                f"{what}, without a journal (a new file passes over the inodes deleted on it "
                "in the last 1–6 minutes: `benchmarks/filesystem.py`)"
            )
        if self.journal:
            return f"{what}, with a journal"
        return what


def describe(
    path: Path, mounts: Path = Path("/proc/self/mounts"), jbd2: Path = Path("/proc/fs/jbd2")
) -> Filesystem | None:
    """The filesystem `path` is on (the mount whose point is its longest prefix), or None when
    the mount table cannot be read (not Linux)."""
    try:
        table = mounts.read_text()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        source, point, fs_type = (_unescape(f) for f in fields[:3])
        if _contains(point, target) and (best is None or len(point) >= len(best[0])):
            best = (point, fs_type, source)  # a later mount over the same point hides earlier
    if best is None:
        return None
    point, fs_type, source = best
    return Filesystem(point, fs_type, source, _journal(fs_type, source, jbd2))


def state_filesystem(directory: Path) -> str:
    """`describe(directory)` in words, for a benchmark's report ("" when unknown)."""
    found = describe(directory)
    return "" if found is None else found.summary()


def _contains(point: str, target: str) -> bool:
    return point == "/" or target == point or target.startswith(point.rstrip("/") + "/")


def _journal(fs_type: str, source: str, jbd2: Path) -> bool | None:
    """Whether jbd2 keeps a journal for `source` (its entries are named `<device>-<inode>`,
    such as `vda-8` or `dm-0-8`); None when that cannot be told."""
    if fs_type not in _JBD2 or not source.startswith("/dev/"):
        return None
    try:
        entries = [p.name for p in jbd2.iterdir()]
    except OSError:
        return None
    device = os.path.basename(os.path.realpath(source))  # /dev/mapper/x → dm-0
    return any(name.rpartition("-")[0] == device for name in entries)


def _unescape(field: str) -> str:
    """A mount table field with its octal escapes (`\\040` for a space) undone."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)

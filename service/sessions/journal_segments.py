"""The journal's segment files on disk: their names, finding them, and the file work a segment
needs beyond appending to it.

A segment is `<sequence>.log` (twelve digits) in the journal's directory, or
`<sequence>.<valid bytes>.log` for one a refused append tore and could not cut back: only its
first <valid bytes> count (`mark_valid_length`). The held segment (`Journal.hold`) is written
whole through `<sequence>.held` and renamed into place (`write_whole`), so a crash finds it old
or new, never a part; a stray `.held` file is what a crash cut short (`clear_stray_held`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from service.sessions.record_files import replace_file

log = logging.getLogger(__name__)

_SEGMENT_RE = re.compile(r"^(\d{12})(?:\.(\d{1,20}))?\.log$")


def segment_path(directory: Path, seq: int) -> Path:
    """Where segment `seq` is written (its name before any mark)."""
    return directory / f"{seq:012d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """The segments in `directory` (sequence, path), oldest first; none where it is missing."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            m = _SEGMENT_RE.fullmatch(entry.name)
            if m:
                found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found)


def sequence_of(segment: Path) -> int:
    """The sequence number in a segment's name (0 for a name that is not a segment's)."""
    m = _SEGMENT_RE.fullmatch(segment.name)
    return int(m.group(1)) if m is not None else 0


def valid_length(segment: Path) -> int | None:
    """How many bytes of `segment` count: all (None), or what its name says."""
    m = _SEGMENT_RE.fullmatch(segment.name)
    return int(m.group(2)) if m is not None and m.group(2) is not None else None


def mark_valid_length(directory: Path, seq: int, size: int, cut_failed: OSError) -> Path | None:
    """Rename segment `seq` to say only its first `size` bytes count, where cutting it back
    failed (`cut_failed`): a rename needs no data block. Its new path, or None when the rename
    failed too (logged: a crash now would replay what follows)."""
    path = segment_path(directory, seq)
    marked = directory / f"{seq:012d}.{size}.log"
    try:
        os.rename(path, marked)
    except OSError as exc:
        log.critical("journal segment %s holds a refused batch that could not be cut "
                     "(%s) nor marked (%s): a crash now would replay it", path,
                     cut_failed, exc)  # fmt: skip
        return None
    return marked


def write_whole(directory: Path, seq: int, data: bytes, durable: bool) -> None:
    """Write (or replace) segment `seq` whole: a temporary file, synced where `durable`, renamed
    over it, so a crash finds the old contents or the new, never a part. Raises OSError."""
    path = segment_path(directory, seq)
    replace_file(path, path.with_suffix(".held"), data, durable, mode=0o600)  # as every segment


def clear_stray_held(directory: Path) -> None:
    """Delete what a crash left of a held segment's write (`write_whole`)."""
    for stray in directory.glob("*.held"):
        with contextlib.suppress(OSError):
            stray.unlink()


def close_segment(fd: int) -> None:
    """fsync and close a full segment's descriptor."""
    with contextlib.suppress(OSError):
        os.fsync(fd)
    with contextlib.suppress(OSError):
        os.close(fd)

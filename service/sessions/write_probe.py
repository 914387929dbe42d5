"""Whether a directory takes a write now: one page written to a file of its own, fsynced, and
removed. The journal learns that its disk refuses writes from an append that fails; while no
step comes (a replica reported not ready gets none), only a probe can tell that the disk takes
writes again."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PROBE_BYTES = 4096  # a page: a disk whose last page the journal is still filling has no room


def takes_writes(directory: Path) -> bool:
    """Whether `directory` took a page and its fsync (blocking: run it on a thread)."""
    path = Path(directory) / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, bytes(PROBE_BYTES)) != PROBE_BYTES:
                return False
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)

"""Whether a directory takes a write now: a file of its own written, fsynced and removed. The
journal learns that its disk refuses writes from an append that fails; while no step comes (a
replica reported not ready gets none), only a probe can tell that the disk takes writes again.

The probe asks for as much room as the batch the journal last failed to write (at least a page,
at most `MAX_PROBE_BYTES`): a retry of that batch goes to a fresh segment, as the probe's bytes
go to a fresh file, so a disk with room for a page but not for the batch is not reported ready
only to refuse the retry (and flap). Its bytes are random: a filesystem that stores zero pages
as holes, or compresses, could take a page of zeros while full."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PROBE_BYTES = 4096  # a page: a disk whose last page the journal is still filling has no room
MAX_PROBE_BYTES = 1 << 20  # a bigger batch is probed with this much (its retry may still fail)


def takes_writes(directory: Path, size: int = PROBE_BYTES) -> bool:
    """Whether `directory` took `size` random bytes (at least `PROBE_BYTES`, at most
    `MAX_PROBE_BYTES`) and their fsync (blocking: run it on a thread)."""
    data = os.urandom(min(max(size, PROBE_BYTES), MAX_PROBE_BYTES))
    path = Path(directory) / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, data) != len(data):
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

"""Flushing the checkpoints' filesystem before a journal segment goes.

A segment may be deleted once the checkpoints that released it are on disk. They are written
without an fsync each, so one `syncfs` of their filesystem covers them all, on a descriptor
kept open from the journal's start: the kernel reports a writeback error to each descriptor
open when it happened, so a descriptor opened later would miss one. Where the C library has
no syncfs, `sync`. Once a flush fails, no segment is deleted until the server restarts
(recovery reads and skips the records the checkpoints cover).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from service.sessions.record_files import syncfs, syncfs_fd

log = logging.getLogger("service.sessions.journal")  # its messages are the journal's


class CheckpointsFlush:
    def __init__(self, checkpoints: Path | None) -> None:
        """`checkpoints`: their directory; None: nothing to flush (none are written, or the
        fsync policy is never)."""
        self._checkpoints = checkpoints
        self._fd: int | None = None  # kept open: it sees every writeback error
        self._failed = False

    def open(self) -> None:
        """Keep a descriptor from now on (the journal's start)."""
        if self._checkpoints is not None:
            self._fd = os.open(self._checkpoints, os.O_RDONLY | os.O_DIRECTORY)

    def close(self, *, in_use: bool = False) -> None:
        """Let the descriptor go; left open when `in_use` (the janitor may be flushing
        through it)."""
        fd, self._fd = self._fd, None
        if fd is not None and not in_use:
            os.close(fd)

    def __call__(self) -> bool:
        """Flush; False when it fails, and from then on until a restart."""
        if self._checkpoints is None:
            return True
        if self._failed:
            return False
        try:
            fd = self._fd  # None: not started (recovery's drop) or closed, one for now
            flushed = syncfs(self._checkpoints) if fd is None else syncfs_fd(fd, self._checkpoints)
            if not flushed:
                os.sync()
        except OSError as exc:
            self._failed = True
            log.error("could not flush the checkpoints in %s (%s); no journal segment is "
                      "deleted until the server restarts", self._checkpoints, exc)  # fmt: skip
            return False
        return True

"""Spare files of the spill tier: files kept to be written over instead of made anew, and the
atomic trade of names (renameat2 with RENAME_EXCHANGE) that puts one in a record's place.

Only where no power loss is promised (`SpillTier(ordered=False)`; the spill tier's docstring
says why). A spare (`.spare-N` in the tier's directory) holds an older record of a live
session, or an ended session's last one: at most `MAX_SPARES` of them, holding at most
`MAX_SPARE_BYTES`, outside the tier's byte cap. Taking and giving back are under a lock: the
shutdown writer's thread writes beside the event loop's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading

from service.libc import libc

log = logging.getLogger(__name__)

SPARE_PREFIX = ".spare-"  # a spare file: `SPARE_PREFIX` + a number
MAX_SPARES = 1024  # files kept for reuse
MAX_SPARE_BYTES = 16 << 20  # what the kept spares may hold (older records; not in the cap)
_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
_AT_FDCWD = -100


class SpareFiles:
    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._spares: list[tuple[str, int]] = []  # files to write over: (path, bytes)
        self._bytes = 0
        self._made = 0
        self._lock = threading.Lock()
        self._exchange = getattr(libc(), "renameat2", None) is not None  # off where refused

    @property
    def can_exchange(self) -> bool:
        """Whether names may be traded here (not yet refused by the filesystem)."""
        return self._exchange

    def take(self, make: bool) -> str | None:
        """A spare to write into; with none left, a new name (`make`) or None."""
        with self._lock:
            if self._spares:
                spare, size = self._spares.pop()
                self._bytes -= size
                return spare
            if not make:
                return None
            return self._new_name()

    def give_back(self, spare: str, size: int) -> None:
        """Keep `spare` (holding `size` bytes) for reuse, or delete it past the caps."""
        with self._lock:
            if len(self._spares) < MAX_SPARES and self._bytes + size <= MAX_SPARE_BYTES:
                self._spares.append((spare, size))
                self._bytes += size
                return
        with contextlib.suppress(OSError):
            os.unlink(spare)

    def keep(self, path: str, size: int) -> bool:
        """An ended session's file (of `size` bytes) becomes a spare, moved out of the record's
        name in one step; False when the spares are at their caps. Its bytes stay until a
        record is written over them or the spares are dropped: emptying it cost ~70 µs more
        here (its blocks freed, then allocated again for the next record)."""
        with self._lock:
            if len(self._spares) >= MAX_SPARES or self._bytes + size > MAX_SPARE_BYTES:
                return False
            spare = self._new_name()
        os.rename(path, spare)
        self.give_back(spare, size)
        return True

    def drop(self) -> bool:
        """Delete the spares; whether there were any."""
        with self._lock:
            spares, self._spares, self._bytes = self._spares, [], 0
        for spare, _ in spares:
            with contextlib.suppress(OSError):
                os.unlink(spare)
        return bool(spares)

    def trade_names(self, spare: str, final: str) -> bool:
        """renameat2(spare, final, RENAME_EXCHANGE): False where the kernel or filesystem
        refuses the flag (then never tried again) or `final` is missing; raises OSError for
        anything else."""
        if not self._exchange:
            return False
        call = libc().renameat2
        if (
            call(_AT_FDCWD, os.fsencode(spare), _AT_FDCWD, os.fsencode(final), _RENAME_EXCHANGE)
            == 0
        ):
            return True
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            log.info("%s cannot exchange names (%s): records are replaced by rename",
                     self._dir, os.strerror(code))  # fmt: skip
            self._exchange = False
            return False
        if code == errno.ENOENT:
            return False
        raise OSError(code, os.strerror(code), final)

    def _new_name(self) -> str:
        self._made += 1  # under `_lock`
        return f"{self._dir}/{SPARE_PREFIX}{self._made}"

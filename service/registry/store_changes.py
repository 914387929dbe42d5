"""Knowing that the model store has not changed without reading it again: inotify (Linux).

Every `CreateSession` resolves its version against the store as it is on disk now (README,
Version rollouts). Reading the store costs a trip to the store-reader thread, a listing and a
`stat` per file: ~0.3 ms of server CPU a creation, a fifth of all it cost (measured, issue 13).
Where the store is on a local filesystem the kernel can say instead that nothing changed:
watches on the store's folder, on each model's and each version's folder report every file
created, written, truncated, moved, deleted or chmod-ed in them; a watch on each file in those
reports writes to it through any of its names (a hard link elsewhere); a watch on each folder
above the store reports it renamed or removed (a release swapped in by `mv`). Each event is
queued before the call that made the change returns. A reading taken while no event arrived
(watches set up first, the queue checked after) is therefore still the store as it is now,
until the next event.

`mark()` reads the queue without blocking (a `read(2)` of an in-kernel queue, never the disk), so
it is safe on the event loop even when the disk is slow. Any event at all moves the mark (no
attempt to tell which model it concerns), an overflow of the queue too.

Not used, and every resolution reads the store as before, where the kernel would not see every
change: a network or FUSE filesystem (changes made by other hosts are not reported), a store
reached through a symbolic link or a model with a symbolic link in its folder or its versions'
(a change to a link's target is not in a watched folder), a platform without inotify, no
inotify instance or watch left (`fs.inotify.max_user_instances`, `max_user_watches`), or the
`registry_notify` setting off. Not seen at all: writes through a shared writable `mmap` of a
store file until it is unmapped, and a filesystem mounted over the store or a folder above it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import weakref
from pathlib import Path

from service.libc import libc
from service.registry.manifest import MODEL_NAME_RE

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_ONLYDIR = 0x400, 0x800, 0x01000000
# What changes a folder's entries or a file's bytes or identity; not reads (IN_ACCESS, IN_OPEN).
WATCHED = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)  # fmt: skip
# A file's own watch: its bytes or times changed through any of its names.
FILE_WATCHED = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
# The folders above the store: renamed or removed, the store's path means other folders now.
ABOVE = IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
# Filesystems on which every change goes through this kernel, so inotify reports it.
LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "f2fs", "zfs",
     "bcachefs", "jfs", "reiserfs"}
)  # fmt: skip


class StoreChanges:
    """Watches of one store's folders, and a mark that moves whenever anything in them changes.

    `watch(model)` runs on the store-reader thread, before that model is read; `mark()` on the
    event loop. A resolution read between two equal marks, with `watch` true, holds until the
    mark moves."""

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = root
        self._fd: int | None = None  # opened by the first watch
        self._mark = 0
        self._lock = threading.Lock()  # the first watches open the instance once
        self._why_not: str | None = None if enabled else "registry_notify is off"
        self._logged: set[str] = set()
        self._filesystems: dict[int, str] = {}  # st_dev -> type, from mountinfo

    @property
    def active(self) -> bool:
        return self._fd is not None

    def mark(self) -> int:
        """The current mark: it has moved since an earlier call if anything changed between."""
        fd = self._fd
        if fd is None:
            return self._mark
        try:
            while os.read(fd, 64 * 1024):
                self._mark += 1
        except BlockingIOError:  # the queue is empty
            pass
        except OSError:  # cannot happen with a valid descriptor; count it as a change
            self._mark += 1
        return self._mark

    def watch(self, model: str) -> bool:
        """Watch the store (the folders above it, its own folder, `model`'s, each version's,
        and every file in those two) on the reader thread, before reading the model. False when
        a change might go unreported: the resolution read next must not be kept."""
        if self._why_not is not None:
            return False
        if not MODEL_NAME_RE.fullmatch(model):
            return False  # no model's name (a path, say): nothing watched, the reading refuses it
        try:
            fd = self._instance()
        except OSError as exc:
            return self._refuse(f"changes are not watched ({exc})", None)
        try:
            root = os.path.abspath(self.root)
            if os.path.realpath(root) != root:  # again: it may have become one since
                return self._refuse("the store is reached through a symbolic link", None)
            watches: list[tuple[str, int]] = [(p, ABOVE) for p in map(str, Path(root).parents)]
            watches.append((root, WATCHED))
            folders = [os.path.join(root, model)]
            with os.scandir(folders[0]) as entries:
                folders += [e.path for e in entries if e.name.isdigit() and e.is_dir()]
            for folder in folders:
                watches.append((folder, WATCHED))
                with os.scandir(folder) as entries:
                    for e in entries:
                        if e.is_symlink():
                            return self._refuse(f"{e.path} is a symbolic link", model)
                        if e.is_file():  # its own watch: a hard link's writes reach only it
                            watches.append((e.path, FILE_WATCHED))
            for path, mask in watches:
                if mask != FILE_WATCHED and not self._local(path):
                    return self._refuse(f"{path} is not on a local filesystem", model)
                if libc().inotify_add_watch(fd, os.fsencode(path), mask) < 0:
                    if ctypes.get_errno() == errno.ENOSPC:
                        return self._refuse("no inotify watch left (max_user_watches)", model)
                    return False  # it vanished meanwhile
        except (OSError, ValueError):  # no such model, or a folder vanished while listed
            return False
        return True

    def close(self) -> None:
        with self._lock:  # not while a first watch opens the instance
            fd, self._fd = self._fd, None
            self._why_not = "closed"
        if fd is not None:
            self._finalizer.detach()
            os.close(fd)

    # ---- internals -----------------------------------------------------------------------

    def _instance(self) -> int:
        with self._lock:
            if self._why_not is not None:
                raise OSError(self._why_not)
            if self._fd is None:
                self._filesystems = mounted_filesystems()
                try:
                    init = libc().inotify_init1
                except AttributeError:  # not Linux
                    raise OSError("no inotify in this C library") from None
                fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
                if fd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"inotify_init1: {os.strerror(err)}")
                self._finalizer = weakref.finalize(self, os.close, fd)
                self._fd = fd
            return self._fd

    def _local(self, folder: str) -> bool:
        return self._filesystems.get(os.stat(folder).st_dev) in LOCAL_FILESYSTEMS

    def _refuse(self, why: str, model: str | None) -> bool:
        if model is None:  # nothing will be watched: the instance goes
            self.close()
            self._why_not = why
        if why not in self._logged:
            self._logged.add(why)
            log.info("model store %s: %s; new sessions read the store each time", self.root, why)
        return False


def mounted_filesystems(mountinfo: str = "/proc/self/mountinfo") -> dict[int, str]:
    """Device number -> filesystem type of every mount this process sees (Linux)."""
    found: dict[int, str] = {}
    with open(mountinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            try:
                major, minor = fields[2].split(":")
                fstype = fields[fields.index("-", 6) + 1]
            except (IndexError, ValueError):
                continue
            found[os.makedev(int(major), int(minor))] = fstype
    return found

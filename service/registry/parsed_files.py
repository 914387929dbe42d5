"""Store files parsed once and kept while they stay unchanged on disk.

New sessions resolve their version against the store on disk, so an alias moved by hand is
followed by the very next CreateSession. Reading and validating `manifest.json` and
`aliases.json` for that cost more than the rest of a creation; a file's parse (or the error it
raised) is kept while its identity, inode, size and mtime (`digests.file_identity`), is the same,
so a creation costs a `stat` per file instead.

A file changed less than `SETTLE_NS` ago is never kept: a rewrite in place within the same
clock tick leaves the mtime as it was (git's "racily clean" files), but a file whose mtime is
seconds old cannot be rewritten without its mtime changing. Writers here replace files
atomically (a new inode) anyway.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from service.registry.digests import FileIdentity, file_identity

T = TypeVar("T")

SETTLE_NS = 2_000_000_000  # mtimes come from a coarse clock; two seconds is well past a tick


class ParsedFiles(Generic[T]):
    """`parse(path)` results (or errors) per file, kept while its identity is unchanged."""

    def __init__(self, parse: Callable[[Path], T], limit: int = 4096) -> None:
        self._parse = parse
        self._limit = limit
        self._kept: OrderedDict[Path, tuple[FileIdentity, T | None, Exception | None]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()  # scans run on worker threads, several at once

    def get(self, path: Path) -> T:
        """What `parse(path)` returns or raises, parsing again only if the file changed."""
        identity = file_identity(path)
        with self._lock:
            kept = self._kept.get(path)
            if kept is not None and identity is not None and kept[0] == identity:
                self._kept.move_to_end(path)
            else:
                kept = None
        if kept is not None:
            value, error = kept[1], kept[2]
            if error is not None:
                raise error.with_traceback(None)
            return value  # type: ignore[return-value]  # None only when `error` is set
        try:
            value = self._parse(path)
        except Exception as exc:
            self._keep(path, identity, None, exc)
            raise
        self._keep(path, identity, value, None)
        return value

    def _keep(
        self, path: Path, identity: FileIdentity | None, value: T | None, error: Exception | None
    ) -> None:
        with self._lock:
            if identity is None or time.time_ns() - identity[2] < SETTLE_NS:
                self._kept.pop(path, None)  # missing, or too fresh to trust its mtime
                return
            self._kept[path] = (identity, value, error)
            self._kept.move_to_end(path)
            while len(self._kept) > self._limit:
                self._kept.popitem(last=False)

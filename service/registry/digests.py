"""The one weights digest check, and the verdicts it has reached per file.

Everything that trusts a weights file goes through `check_digest`: loading (on the very bytes
about to be parsed), `verify`, re-checking a loaded version against the store, and choosing
which version new sessions get. `DigestVerdicts` remembers each file's verdict while the file
is unchanged (same inode, size and mtime), so a file is hashed again only after it changed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.errors import DigestMismatch, VersionUnusable
from service.registry.weights import sha256_hex

log = logging.getLogger(__name__)

FileIdentity = tuple[int, int, int]  # (inode, size, mtime ns): changes when the file does


def file_identity(path: Path) -> FileIdentity | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def check_digest(data: bytes, expected: str, path: Path) -> None:
    """DigestMismatch (DATA_LOSS), naming the file and both digests, unless `data` hashes to
    `expected`."""
    actual = sha256_hex(data)
    if actual != expected:
        raise DigestMismatch(
            f"{path}: sha256 mismatch: manifest expects {expected}, file has {actual}"
        )


def read_verified(path: Path, expected: str) -> bytes:
    """The file's bytes, read once, after checking their sha256 against `expected`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VersionUnusable(f"{path}: unreadable: {exc}") from exc
    check_digest(data, expected, path)
    return data


class DigestVerdicts:
    """`check_digest` verdicts per weights file, kept while the file stays as it was hashed."""

    def __init__(self) -> None:
        # path → (identity when hashed, expected digest, None if it matched else the message)
        self._verdicts: dict[Path, tuple[FileIdentity, str, str | None]] = {}

    def check(self, path: Path, expected: str) -> None:
        """Raise DigestMismatch (or VersionUnusable: missing, unreadable) unless the file hashes
        to `expected`. Blocking: hashes the file unless its verdict is known."""
        before = file_identity(path)
        if before is None:
            raise VersionUnusable(f"{path}: missing")
        known = self._verdicts.get(path)
        if known is not None and known[:2] == (before, expected):
            if known[2] is not None:
                raise DigestMismatch(known[2])
            return
        try:
            read_verified(path, expected)
        except DigestMismatch as exc:
            self._remember(path, before, expected, exc.message)
            raise
        self._remember(path, before, expected, None)

    def _remember(
        self, path: Path, before: FileIdentity, expected: str, problem: str | None
    ) -> None:
        if file_identity(path) != before:  # rewritten while we read it: decide next time
            self._verdicts.pop(path, None)
            return
        if problem is not None and self._verdicts.get(path, (None, None, None))[2] != problem:
            log.error("%s", problem)
        self._verdicts[path] = (before, expected, problem)

"""The one weights digest check, and the verdicts it has reached per file.

Everything that trusts a weights file goes through `check_digest`: loading (on the very bytes
about to be parsed), `verify`, re-checking a loaded version against the store, and choosing
which version new sessions get. `DigestVerdicts` remembers each file's verdict while the file
is unchanged (same inode, size and mtime), so a file is hashed again only after it changed; with
it, whether the file's tensors fit the architecture its manifest describes (the check a load
makes), so choosing a version never picks one that loading would refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.errors import DigestMismatch, VersionUnusable, WeightsMismatch
from service.models import ModelConfig
from service.registry.weights import check_tensors, deserialize, sha256_hex

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


@dataclass(frozen=True)
class _Verdict:
    identity: FileIdentity  # the file when it was judged
    expected: str  # the digest it was checked against
    digest_problem: str | None  # None: it hashed to `expected`
    # Architecture → None when the file's tensors fit it, else why not (only when it hashed
    # to `expected`: unverified bytes are never parsed).
    fits: Mapping[ModelConfig, str | None]


class DigestVerdicts:
    """`check_digest` verdicts per weights file, and whether its tensors fit the architectures
    asked about, kept while the file stays as it was read."""

    def __init__(self) -> None:
        self._verdicts: dict[Path, _Verdict] = {}

    def check(self, path: Path, expected: str, config: ModelConfig | None = None) -> None:
        """Raise DigestMismatch (or VersionUnusable: missing, unreadable) unless the file hashes
        to `expected`, and, given `config`, WeightsMismatch unless its tensors fit it (the check
        a load makes). Blocking: reads the file unless its verdict is known."""
        before = file_identity(path)
        if before is None:
            raise VersionUnusable(f"{path}: missing")
        known = self._verdicts.get(path)
        if known is None or (known.identity, known.expected) != (before, expected):
            known = self._judge(path, before, expected, config, {})
        elif known.digest_problem is None and config is not None and config not in known.fits:
            known = self._judge(path, before, expected, config, known.fits)
        if known.digest_problem is not None:
            raise DigestMismatch(known.digest_problem)
        problem = known.fits.get(config) if config is not None else None
        if problem is not None:
            raise WeightsMismatch(problem)

    def _judge(
        self,
        path: Path,
        before: FileIdentity,
        expected: str,
        config: ModelConfig | None,
        fits: Mapping[ModelConfig, str | None],
    ) -> _Verdict:
        try:
            data = read_verified(path, expected)
        except DigestMismatch as exc:
            verdict = _Verdict(before, expected, exc.message, {})
        else:
            fits = dict(fits)
            if config is not None:
                try:
                    check_tensors(deserialize(data, str(path)), config, str(path))
                    fits[config] = None
                except WeightsMismatch as exc:
                    fits[config] = exc.message
            verdict = _Verdict(before, expected, None, fits)
        self._remember(path, verdict)
        return verdict

    def _remember(self, path: Path, verdict: _Verdict) -> None:
        if file_identity(path) != verdict.identity:  # rewritten while we read it: decide next time
            self._verdicts.pop(path, None)
            return
        for problem in sorted(_problems(verdict) - _problems(self._verdicts.get(path))):
            log.error("%s", problem)  # once per file and problem, not at every check
        self._verdicts[path] = verdict


def _problems(verdict: _Verdict | None) -> set[str]:
    if verdict is None:
        return set()
    return {p for p in (verdict.digest_problem, *verdict.fits.values()) if p is not None}

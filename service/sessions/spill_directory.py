"""The spill directory as a whole, apart from its records: one server's lock on it, what a start
finds there (`TierScan`), and the marker of a clean stop.

One server owns a directory at a time: `claim` holds an exclusive lock on `.lock` inside it,
and proves the directory writable before the first eviction needs it; without the journal, it
refuses a directory whose journal holds records (`_refuse_a_journal`). `scan` clears what a
crash or the last run left (temporary files, spares) and reads every record's header, so a
start learns which sessions there are without reading their state; a record it cannot read is
reported, with its owner when that much is readable, apart from one a newer seqserve wrote (a
later format, whole: `spill_record.newer`), which is not damage. `mark_clean_stop` records when
the server stopped, so the next start knows how long nobody could reach it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import SpillCorrupted, SpillDirUnusable, SpillTierInUse
from service.sessions import spill_record
from service.sessions.journal_segments import list_segments
from service.sessions.session import SESSION_ID_PATTERN
from service.sessions.spare_files import SPARE_PREFIX
from service.sessions.spill_record import SpillHeader
from service.settings import SPILL_DIR_VARIABLE

log = logging.getLogger(__name__)

SUFFIX = ".spill"
STOP_MARKER = ".stopped_at"  # wall time of the last clean stop
JOURNAL_SUBDIR = "journal"  # the journal's segments (`durability = "journal"`)
WORKERS_DATABASE = "state.db"  # the SQLite tier of `serve --workers` without a state URL
# How a record is named in messages a client may see: never the server's path (it is logged).
SOURCE = "its spill record"
_ID_RE = re.compile(SESSION_ID_PATTERN)


@dataclass
class TierScan:
    """What `open()` found on disk."""

    headers: list[SpillHeader] = field(default_factory=list)  # readable records
    broken: dict[str, str] = field(default_factory=dict)  # session id → what is wrong
    stopped_at: float | None = None  # wall time of the last clean stop; None after a crash
    owners: dict[str, str] = field(default_factory=dict)  # broken session → owner, if readable
    # Records of a later format a newer seqserve wrote, whole: session id → their owner ("" if
    # none). Neither readable nor damaged.
    newer: dict[str, str] = field(default_factory=dict)


def claim(directory: Path, setting: str = SPILL_DIR_VARIABLE, *, journaled: bool = True) -> int:
    """Create and lock the directory, and check it can be written; the lock's descriptor
    (closing it releases the lock). SpillDirUnusable when the directory cannot be created,
    locked or written, naming `setting` (the variable that set the directory), or, not
    `journaled` (`durability = "shutdown"`), when its journal holds records; SpillTierInUse
    when another process holds the lock."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SpillDirUnusable.at(directory, exc, setting) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise SpillTierInUse(
            f"spill directory {directory} is in use by another server process"
        ) from exc
    # A directory we can lock but not write fails here, not at the first eviction; so does a
    # journal subdirectory that is a file or cannot be written (it failed at recovery, with a
    # traceback).
    journal = directory / JOURNAL_SUBDIR
    for where in (directory, journal) if journal.exists() or journal.is_symlink() else (directory,):
        probe = where / f".probe-{os.getpid()}.tmp"
        try:
            if not where.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            os.close(fd)  # releases the lock
            raise SpillDirUnusable.at(where, exc, setting) from None
    if not journaled:
        try:
            _refuse_a_journal(directory)
        except SpillDirUnusable:
            os.close(fd)
            raise
    return fd


def _refuse_a_journal(directory: Path) -> None:
    """Without the journal, a directory whose journal holds records is refused: a server with
    the journal left them (a crash, or a clean stop with replays pending), and they hold steps,
    and sessions, that no checkpoint does. Served without them, the sessions would go on from
    their checkpoints (or be NOT_FOUND), and a later start with the journal would replay them
    over what this server did: a session it closed would come back. Nothing is read or taken
    before this (the clean-stop marker stays); a start with the journal recovers them, and its
    clean stop deletes them. Empty segments hold nothing, and are let be."""
    journal = directory / JOURNAL_SUBDIR
    held = [path for _, path in list_segments(journal) if _size(path) != 0]
    if held:
        raise SpillDirUnusable(
            f"spill directory {directory} holds {len(held)} journal segments that a server with "
            f"durability=journal left in {journal}: their steps are in no checkpoint, and a "
            "start without the journal would ignore them, to be replayed over its sessions by "
            "a later start with it; start once with SEQSERVE_SESSIONS__DURABILITY=journal to "
            "recover them (its clean stop deletes them, but for the records it keeps for the "
            "sessions it refuses, their version missing from the store or written by a newer "
            "seqserve: those stay until their owners close them)"
        )


def _size(path: Path) -> int | None:
    """The file's size; None when it cannot be read (counted as holding records)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def scan(directory: Path) -> tuple[TierScan, dict[str, int]]:
    """Clear temp files a crash left and spares, and read every record's header: what was
    found, and each record's size on disk (session id → bytes), readable or not."""
    found = TierScan(stopped_at=_take_stop_marker(directory))
    sizes: dict[str, int] = {}
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".tmp") or path.name.startswith(SPARE_PREFIX):
            path.unlink(missing_ok=True)  # a write a crash cut short, or a spare
            continue
        if path.suffix != SUFFIX or not _ID_RE.fullmatch(path.stem):
            continue
        sizes[path.stem] = path.stat().st_size
        try:
            header = _read_header(path)
            if header.session_id != path.stem:
                raise SpillCorrupted(f"{SOURCE} holds another session's state")
        except SpillCorrupted as exc:
            owner = _newer_owner(path)
            if owner is not None:
                found.newer[path.stem] = owner
                log.warning("spill record %s was written by a newer seqserve: kept, its "
                            "session refused", path)  # fmt: skip
                continue
            found.broken[path.stem] = exc.message  # what the session's owner is told
            found.owners[path.stem] = exc.owner or _owner_of(path)
            log.warning("spill record %s refused: %s", path, exc.message)
            continue
        found.headers.append(header)
    return found, sizes


def mark_clean_stop(directory: Path, wall_time: float) -> None:
    """Write the clean-stop marker (`wall_time`), synced; the caller syncs the directory."""
    marker = directory / STOP_MARKER
    tmp = marker.with_name(f"{STOP_MARKER}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(repr(wall_time))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)


def _take_stop_marker(directory: Path) -> float | None:
    """Read and remove the clean-stop marker: a later crash must not find a stale one."""
    marker = directory / STOP_MARKER
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return None
    marker.unlink()
    try:
        return float(text)
    except ValueError:
        log.warning("ignoring unreadable %s: %r", marker, text[:40])
        return None


def _read_header(path: Path) -> SpillHeader:
    try:
        with path.open("rb") as f:
            length, _owner = spill_record.read_prefix(f.read)
            raw = f.read(length)
    except OSError as exc:
        raise SpillCorrupted(f"{SOURCE} is unreadable ({exc.strerror})") from exc
    if len(raw) != length:
        raise SpillCorrupted(f"{SOURCE} has a truncated header")
    return spill_record.parse_header(raw, SOURCE)


def _newer_owner(path: Path) -> str | None:
    """The owner a record of a newer format names ("" for none), or None when the record is
    not one (`spill_record.newer`): its magic's version is checked before it is read whole."""
    try:
        with path.open("rb") as f:
            if not spill_record.newer_magic(f.read(len(spill_record.MAGIC))):
                return None
            f.seek(0)
            data = f.read()
    except OSError:
        return None
    return spill_record.newer_owner(data) if spill_record.newer(data) else None


def _owner_of(path: Path) -> str:
    """The owner block of a record whose header is damaged (empty when that is too)."""
    try:
        with path.open("rb") as f:
            return spill_record.read_prefix(f.read)[1] or ""
    except (OSError, SpillCorrupted) as exc:
        return getattr(exc, "owner", "")

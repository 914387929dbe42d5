"""The spill tier: one `<session id>.spill` file per session in a directory, under a size cap.

Files appear whole or not at all: a record is written to a file of another name, then renamed
into place. Where a power loss is promised (`ordered`, the default) that file is new: ext4
writes a new file's data before a rename over an existing record commits (`auto_da_alloc`), so
a power loss leaves the name on the old record or the new one; it orders neither an overwrite
in place nor a file made for an exchange (two reviews; docs/per-core-passes.md, "Fifteenth pass").
Elsewhere (`FSYNC=never`, `DURABILITY=shutdown`) files are reused, which this machine's disk charges
less for (`service.sessions.spare_files`): a replacing record is written over a spare in place and
trades names with the old record, whose file is the next spare; a first record goes over a
spare when there is one; an ended session's file is kept as a spare. Spares are dropped first
when the disk is full, and removed by `open()` and `close()`.

Records are not fsynced one by one: they are written on the request path, and a process crash
keeps them in the page cache anyway; only a power loss can tear one, and then its checksum
refuses it (the journal flushes the checkpoints before it deletes a segment they released).
A graceful shutdown calls `sync()`, which fsyncs every file written since the last sync, and
the directory. A durable write (a fork's first record) fsyncs its file and the directory; when
either fails, it is refused as a write the disk refused.

One server owns a directory at a time: `open()` takes an exclusive lock on `.lock` inside it
(`service.sessions.spill_directory`, which also reads what a start finds there).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.errors import Internal, SpillCorrupted, SpillTierFull
from service.sessions import spill_directory, spill_record
from service.sessions.record_files import (
    fsync_dir,
    overwrite_file,
    read_file,
    syncfs,
    write_file,
)
from service.sessions.spare_files import SpareFiles
from service.sessions.spill_directory import SOURCE as _SOURCE
from service.sessions.spill_directory import SUFFIX, TierScan
from service.sessions.spill_record import SpillRecord
from service.settings import SPILL_DIR_VARIABLE

log = logging.getLogger(__name__)

_SYNC_THREADS = 8  # fsyncs in parallel share journal commits
# From this many records on, one syncfs(2) of the directory's filesystem replaces an fsync per
# file: 50,000 records of 6 KB took 0.4-0.7 s that way against 4.8 s (README, Durability).
SYNCFS_FROM = 1024


class SpillTier:
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        ordered: bool = True,
        setting: str = SPILL_DIR_VARIABLE,
        journaled: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self._setting = setting  # what set the directory, named when it fails
        self._journaled = journaled  # False: a journal holding records refuses `open`
        # Whether a record must reach the disk before the name that points at it, for a power
        # loss (the module's docstring); False where nothing is promised past a killed process.
        self._ordered = ordered
        self._dir = str(self.directory)
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] = {}  # session id → bytes on disk
        self._bytes = 0
        self._unsynced: set[str] = set()
        self._lock_fd: int | None = None
        self._spares = SpareFiles(self._dir)  # used only where not `ordered`

    @property
    def ordered(self) -> bool:
        """Whether a record reaches the disk before a name points at it (no spares)."""
        return self._ordered

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def path(self, session_id: str) -> Path:
        return Path(self._file(session_id))

    def _file(self, session_id: str) -> str:
        # Plain strings on the eviction path: pathlib costs more than the syscalls here.
        return f"{self._dir}/{session_id}{SUFFIX}"

    # ---- lifecycle -----------------------------------------------------------------------

    def open(self) -> TierScan:
        """Lock the directory, clear temp files a crash left, and read every record's header.
        SpillDirUnusable when the directory cannot be created, locked or written, or, without
        the journal, when it holds a journal's records (`spill_directory.claim`)."""
        self._lock_fd = spill_directory.claim(
            self.directory, self._setting, journaled=self._journaled
        )
        scan, sizes = spill_directory.scan(self.directory)
        self._sizes.update(sizes)
        self._bytes += sum(sizes.values())
        return scan

    def close(self) -> None:
        self._spares.drop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # ---- records -------------------------------------------------------------------------

    def write(
        self,
        record: SpillRecord,
        *,
        durable: bool = False,
        first: bool = False,
        past_cap: bool = False,
    ) -> None:
        """Write (or replace) a session's record. Raises SpillTierFull over the cap, unless
        `past_cap` (a shutdown writing the sessions in memory: refused, they would be lost; a
        replay after a restart writing the checkpoint of a session that existed before it:
        refused, it could not be served; the pool's size bounds how far past it either goes).
        `first`: a fork's first record, its whole history (no journal record behind it):
        fsynced."""
        durable = durable or first
        session_id = record.header.session_id
        data = spill_record.encode(record)
        new_total = self._bytes - self._sizes.get(session_id, 0) + len(data)
        if new_total > self.max_bytes and not past_cap:
            raise SpillTierFull(
                f"spill tier full ({self._bytes} of {self.max_bytes} bytes); close sessions "
                "or raise SEQSERVE_SESSIONS__SPILL_MAX_BYTES"
            )
        final = self._file(session_id)
        tmp = f"{self._dir}/.{session_id}{SUFFIX}.{os.getpid()}.tmp"
        for attempt in (1, 2):
            try:
                replacing = session_id in self._sizes
                spare = None
                if not self._ordered:  # see the module's docstring
                    spare = self._spares.take(make=replacing and self._spares.can_exchange)
                if spare is None:  # a new file, renamed into place
                    write_file(tmp, data, durable)
                    os.replace(tmp, final)
                else:
                    old = self._sizes.get(session_id, 0)
                    self._write_via(spare, data, final, durable, exchange=replacing, old=old)
                break
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if _full(exc) and attempt == 1 and self._spares.drop():
                    continue  # the spares' disk space is given back: once more
                raise _refused(final, exc, self._setting) from exc
        self._bytes = new_total
        self._sizes[session_id] = len(data)
        if not durable:
            self._unsynced.add(session_id)
            return
        try:
            self._fsync_dir()
        except OSError as exc:
            # The record is in place (indexed: deleting the session deletes it), but its name
            # may not survive a power loss: refused as a failed write is, so the caller does
            # not take it for durable (a fork ends its child). `sync` fsyncs the directory.
            raise _refused(final, exc, self._setting, "its directory's fsync failed: ") from exc
        self._unsynced.discard(session_id)

    def _write_via(
        self, spare: str, data: bytes, final: str, durable: bool, *, exchange: bool, old: int
    ) -> None:
        """`data` into `spare`, which then becomes the record at `final`: by trading names with
        the record there (`exchange`; the old record's file, of `old` bytes, is a spare after),
        else by a rename (a first record; or where the names cannot be traded: a filesystem
        without RENAME_EXCHANGE, or `final` gone from under us). A spare a failed write left
        half-written is deleted."""
        done = traded = False
        try:
            overwrite_file(spare, data, durable)
            traded = exchange and self._spares.trade_names(spare, final)
            if not traded:
                os.replace(spare, final)  # the spare is the record now
            done = True
        finally:
            if traded:
                self._spares.give_back(spare, old)
            elif not done:
                with contextlib.suppress(OSError):
                    os.unlink(spare)

    def read(self, session_id: str) -> SpillRecord:
        """The record, checksum verified. Raises SpillCorrupted if missing or damaged."""
        path = self._file(session_id)
        try:
            data = read_file(path)
        except OSError as exc:
            log.warning("spill record %s unreadable: %s", path, exc)
            raise SpillCorrupted(f"{_SOURCE} is unreadable ({exc.strerror})") from exc
        try:
            record = spill_record.decode(data, _SOURCE)
        except SpillCorrupted as exc:
            log.warning("spill record %s refused: %s", path, exc.message)
            raise
        if record.header.session_id != session_id:
            log.warning("spill record %s holds %s", path, record.header.session_id)
            raise SpillCorrupted(f"{_SOURCE} holds another session's state")
        return record

    def delete(self, session_id: str) -> None:
        size = self._sizes.pop(session_id, None)
        if size is None:
            return
        self._bytes -= size
        self._unsynced.discard(session_id)
        path = self._file(session_id)
        try:
            if not self._ordered and self._spares.keep(path, size):
                return
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not keep spill record %s as a spare (%s); deleting it", path, exc)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # stale, but the index no longer points at it
            log.warning("could not delete spill record %s: %s", path, exc)

    def sync(self) -> None:
        """fsync every record written without it since the last sync, then the directory."""
        ids, self._unsynced = list(self._unsynced), set()
        if len(ids) >= SYNCFS_FROM and syncfs(self.directory):
            pass  # the filesystem's dirty data, these records included, is on disk
        elif ids:
            with ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="spill-sync") as pool:
                list(pool.map(self._fsync_file, ids))
        if self.directory.exists():
            self._fsync_dir()

    def mark_clean_stop(self, wall_time: float) -> None:
        """Record when the server stopped cleanly, so the next start knows how long it was down
        (the idle clock does not run while nobody can reach the server)."""
        spill_directory.mark_clean_stop(self.directory, wall_time)
        self._fsync_dir()

    # ---- internals -----------------------------------------------------------------------

    def _fsync_file(self, session_id: str) -> None:
        try:
            fd = os.open(self._file(session_id), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self) -> None:
        fsync_dir(self.directory)


def _full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _refused(final: str, exc: OSError, setting: str, how: str = "") -> SpillTierFull | Internal:
    """The error a write the disk refused raises (`how`: at which point): SpillTierFull for a
    full disk, naming `setting` (what set the directory), else Internal (logged)."""
    if _full(exc):
        return SpillTierFull(f"spill tier's disk is full ({exc.strerror}); {setting}")
    log.error("could not write spill record %s: %s%s", final, how, exc)
    return Internal(f"could not write a spill record ({exc.strerror})")

"""The journal: append-only segment files holding every acknowledged step since each session's
last checkpoint (`journal/<sequence>.log` in the state directory).

`append` writes a whole batch of records with one `write` (group commit: one per batched step,
not one per session) before any of their replies leave. By default that hands the records to
the OS, which survives a killed process; the fsync policy adds surviving a power loss: after
every batch, every `fsync_interval` seconds (a background thread), or never.

A session's records are needed until its next checkpoint (a spill record). Sessions pin the
segment holding their oldest needed record; older segments that nobody pins are deleted, so
the journal stays about as long as `checkpoint_steps` steps of the busiest sessions.

A write that fails (disk full, read-only, I/O error) raises `JournalUnavailable` and nothing of
the batch counts as written, after a crash either: the segment is cut back to the records
before the batch (a short write leaves whole records of it, which recovery would replay) and
closed, and the next append starts a new one. Where even the cut fails, the segment is renamed
to carry the length it had before the batch, and recovery reads no further (`_discard_torn`).

A session recovery cannot load now (its version missing from the store) keeps its records for a
later restart, but not the segments around them: recovery copies them into a segment of their
own (`hold`), which trimming passes over, and the segments it read are trimmed as usual. Its
records go when its owner closes it (`release`); at the next restart they are read like any
other segment's.

Appends run on the event loop; the slow file work does not. A full segment's final fsync and
close are done by the fsync thread (interval policy: before it syncs anything newer, so the
journal stays a prefix of what was written) or by a janitor thread (the others: their records
are synced by `append`, or never), and the deletion of segments nobody needs (~4-14 ms for a
64 MB one on this machine's disk) by the janitor, in order. A crash before it gets to them
leaves a segment that recovery reads and skips (its records are older than the checkpoints
that replaced them).

The checkpoints that released a segment are written without an fsync each. Before a segment is
deleted, the filesystem holding them (`checkpoints`) is flushed with one syncfs(2), so a power
loss finds each session's steps in a checkpoint on disk or still in the journal; if that flush
fails, the segment stays. Not under the `never` policy, which promises nothing past a killed
process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from service.errors import JournalUnavailable
from service.sessions.journal_record import JournalRecord, decode_stream
from service.sessions.record_files import fsync_dir, syncfs_fd, write_file

log = logging.getLogger(__name__)

FsyncPolicy = Literal["batch", "interval", "never"]
# `<sequence>.log`, or `<sequence>.<valid bytes>.log` for a segment a failed append tore and
# could not cut back: only its first <valid bytes> count.
_SEGMENT_RE = re.compile(r"^(\d{12})(?:\.(\d{1,20}))?\.log$")
_SETTING = "SEQSERVE_SESSIONS__SPILL_DIR"


class Journal:
    def __init__(
        self,
        directory: Path,
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval_seconds: float = 0.2,
        segment_bytes: int = 64 * 1024 * 1024,
        checkpoints: Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._fsync = fsync
        # Where the checkpoints that release segments are written (flushed before a deletion);
        # None: nothing to flush.
        self._checkpoints = checkpoints
        self._checkpoints_fd: int | None = None  # kept open: it sees every writeback error
        self._flush_failed = False  # once a flush fails, no segment is deleted until restart
        self._interval = fsync_interval_seconds
        self._segment_bytes = segment_bytes
        self._seq = 0  # the segment being written
        self.oldest = 0  # the oldest segment `open` found (0: none)
        self._fd: int | None = None
        self._size = 0
        self._pins: dict[int, int] = {}  # segment → sessions whose oldest needed record is there
        self._trimmed_below = 1  # segments below this are deleted
        self._dirty = False
        self._lock = threading.Lock()  # the fsync thread and close
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        # A retired segment's descriptor (fsync, close), a segment to delete, an event to set
        # once what came before is done (`settle`), or None: stop.
        self._chores: queue.SimpleQueue[int | Path | threading.Event | None] = queue.SimpleQueue()
        # With the fsync thread: full segments' descriptors it has yet to fsync, oldest first
        # (under `_lock`). It fsyncs them before the segment being written, so no newer record
        # is made durable before an older one.
        self._retired: list[int] = []
        self._janitor: threading.Thread | None = None
        self.failed_writes = 0  # appends refused because the disk would not take them
        self._failing = False
        # Segments whose file is not `<sequence>.log`: renamed by `_discard_torn`, or found so
        # by `open` (deleted by sequence, as any other).
        self._torn_names: dict[int, Path] = {}
        self._held: dict[str, list[bytes]] = {}  # session → its records recovery holds (`hold`)
        self._held_seq = 0  # the segment holding them (0: none), never trimmed while they live

    @property
    def segment(self) -> int:
        return self._seq

    # ---- start and stop --------------------------------------------------------------------

    def open(self) -> Iterator[JournalRecord]:
        """Every record the segments on disk hold, oldest first (for recovery). Writing starts
        in a new segment once `start()` is called."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stray in self.directory.glob("*.held"):  # a held segment's write a crash cut short
            with contextlib.suppress(OSError):
                stray.unlink()
        for seq, path in self._segments():
            self._seq = max(self._seq, seq)
            self.oldest = self.oldest or seq
            valid = _valid_length(path)
            if valid is not None:
                self._torn_names[seq] = path
            data = path.read_bytes()
            yield from decode_stream(data if valid is None else data[:valid])

    def start(self) -> None:
        """Begin writing (a fresh segment); start the janitor and, for the interval policy, the
        fsync thread."""
        self._roll()
        if self._checkpoints is not None and self._fsync != "never":
            self._checkpoints_fd = os.open(self._checkpoints, os.O_RDONLY | os.O_DIRECTORY)
        self._janitor = threading.Thread(target=self._janitor_loop, name="journal-janitor")
        self._janitor.daemon = True
        self._janitor.start()
        if self._fsync == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, name="journal-fsync")
            self._syncer.daemon = True
            self._syncer.start()

    def drop_before(self, seq: int) -> None:
        """Delete every segment older than `seq` (after recovery checkpointed their sessions),
        once the checkpoints are flushed; not a pinned one or any after it (recovery pins the
        segments of the sessions it could not load when `hold` could not copy them), nor the
        held segment."""
        seq = min(seq, min(self._pins, default=seq))
        old = [(n, path) for n, path in self._segments() if n < seq and n != self._held_seq]
        if old and self._checkpoints_flushed():
            for n, path in old:
                path.unlink(missing_ok=True)
                self._torn_names.pop(n, None)
        self._trimmed_below = max(self._trimmed_below, seq)

    def hold(self, records: dict[str, list[bytes]]) -> bool:
        """Keep `records` (per session: those of the sessions recovery could not load now)
        across restarts, in a segment of their own after the ones `open` read: only what they
        need stays, and the segments read are trimmed as usual (pinning them kept all later
        segments too, for as long as such a session lived). Before `start`. False when the
        segment cannot be written: the caller keeps the segments read instead."""
        if self._fd is not None or self._held_seq or not records:
            return False
        seq = self._seq + 1
        try:
            self._write_held(seq, records)
        except OSError as exc:
            log.error("could not copy the records of sessions held at recovery (%s): the "
                      "journal keeps every segment until they are closed", exc)  # fmt: skip
            return False
        self._seq = self._held_seq = seq  # `start` writes the next one
        self._held = dict(records)
        return True

    def release(self, session_id: str) -> None:
        """A held session was closed (its END journaled first): its records go, and the held
        segment with the last of them. Held records of a closed session must not outlive its
        END, whose segment is trimmed: they would bring it back after a restart."""
        if self._held.pop(session_id, None) is None:
            return
        path = self.directory / f"{self._held_seq:012d}.log"
        if not self._held:
            self._held_seq = 0
            self._chore(path)
            return
        try:
            self._write_held(self._held_seq, self._held)  # the others' records, in its place
        except OSError as exc:
            log.error("could not drop the held records of closed session %s (%s): the "
                      "journal keeps its END's segment and all after it",
                      session_id, exc)  # fmt: skip
            self.pin(self._seq)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=5)
        janitor_busy = False
        if self._janitor is not None:
            self._chores.put(None)  # after everything handed to it
            self._janitor.join(timeout=30)
            janitor_busy = self._janitor.is_alive()
            if janitor_busy:
                log.error("journal janitor still busy at close (a slow disk?)")
            self._janitor = None
        with self._lock:
            self._finish_retired()
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
        fd, self._checkpoints_fd = self._checkpoints_fd, None
        if fd is not None and not janitor_busy:  # a busy janitor may be flushing through it
            os.close(fd)

    # ---- writing -------------------------------------------------------------------------

    def append(self, records: list[bytes]) -> int:
        """Write `records` with one write; returns the segment they went to. Raises
        JournalUnavailable when the disk does not take them (nothing counts as written)."""
        data = b"".join(records)
        try:
            if self._fd is None or self._size >= self._segment_bytes:
                self._roll()
            assert self._fd is not None
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, "short write (the disk is probably full)")
            if self._fsync == "batch":
                os.fsync(self._fd)
        except OSError as exc:
            self._discard_torn()
            self.failed_writes += 1
            if not self._failing:
                self._failing = True
                log.error("journal writes failing: %s (%s)", exc.strerror or exc, self.directory)
            raise JournalUnavailable(
                f"session state cannot be made durable: {exc.strerror or 'write failed'} "
                f"(the state directory, {_SETTING}); the step was not applied, retry later"
            ) from None
        if self._failing:
            self._failing = False
            log.warning("journal writes succeed again after %d failed", self.failed_writes)
        self._size += len(data)
        self._dirty = True
        return self._seq

    def pin(self, seq: int) -> None:
        self._pins[seq] = self._pins.get(seq, 0) + 1

    def unpin(self, seq: int) -> None:
        left = self._pins.get(seq, 0) - 1
        if left > 0:
            self._pins[seq] = left
            return
        self._pins.pop(seq, None)
        floor = min(min(self._pins, default=self._seq), self._seq)
        while self._trimmed_below < floor:  # segments nobody needs: deleted by sequence
            n = self._trimmed_below
            if n != self._held_seq:
                torn = self._torn_names.pop(n, None)
                self._chore(torn or self.directory / f"{n:012d}.log")
            self._trimmed_below += 1

    def settle(self) -> None:
        """Wait until the janitor has done what it was handed (fsyncs, closes, deletions)."""
        if self._janitor is not None and self._janitor.is_alive():
            done = threading.Event()
            self._chores.put(done)
            done.wait(timeout=30)

    def sync(self) -> None:
        with self._lock:
            self._finish_retired()
            if self._fd is not None and self._dirty:
                self._dirty = False
                os.fsync(self._fd)

    # ---- internals -------------------------------------------------------------------------

    def _finish_retired(self) -> None:
        """fsync and close the full segments waiting for it, oldest first: before the segment
        being written, so nothing newer is synced before them. Under `_lock`."""
        retired, self._retired = self._retired, []
        for fd in retired:
            _close_segment(fd)

    def _roll(self) -> None:
        with self._lock:
            full, self._fd = self._fd, None
            try:
                self._seq += 1
                path = self.directory / f"{self._seq:012d}.log"
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._size = 0
            finally:  # the full segment's last fsync and close, even when no new one opened
                if full is not None and self._syncer is not None and self._syncer.is_alive():
                    self._retired.append(full)  # the fsync thread's, before anything newer
                elif full is not None:
                    self._chore(full)

    def _chore(self, work: int | Path) -> None:
        """A full segment's descriptor to fsync and close, or a segment to delete: by the
        janitor, in order, when it runs; here when it does not (before start, after close)."""
        if self._janitor is not None and self._janitor.is_alive():
            self._chores.put(work)
        else:
            self._do(work)

    def _do(self, work: int | Path) -> None:
        """A chore, done now. A segment is deleted only once the checkpoints are flushed."""
        if isinstance(work, int):
            _close_segment(work)
        else:
            self._delete([work])

    def _delete(self, segments: list[Path]) -> None:
        """Delete `segments`, after one flush of the checkpoints for all of them."""
        if self._checkpoints_flushed():
            for path in segments:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _checkpoints_flushed(self) -> bool:
        """Flush the filesystem of the checkpoints (syncfs on a descriptor kept open since
        `start`; sync where there is no syncfs) before a segment goes. False when the flush
        fails, and from then on until a restart: segments are kept (recovery reads and skips
        them)."""
        if self._checkpoints is None or self._fsync == "never":
            return True
        if self._flush_failed:
            return False
        try:
            fd = self._checkpoints_fd
            if fd is None:  # not started (recovery's drop) or closed: a descriptor for now
                fd = os.open(self._checkpoints, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    flushed = syncfs_fd(fd, self._checkpoints)
                finally:
                    os.close(fd)
            else:
                flushed = syncfs_fd(fd, self._checkpoints)
            if not flushed:
                os.sync()
        except OSError as exc:
            self._flush_failed = True
            log.error("could not flush the checkpoints in %s (%s); no journal segment is "
                      "deleted until the server restarts", self._checkpoints, exc)  # fmt: skip
            return False
        return True

    def _janitor_loop(self) -> None:
        held: list[int | Path | threading.Event | None] = []  # taken early, done next
        while True:
            work = held.pop() if held else self._chores.get()
            if work is None:
                return
            if isinstance(work, threading.Event):
                work.set()
                continue
            try:
                if isinstance(work, Path):  # with the deletions queued behind it: one flush
                    segments = [work]
                    while not self._chores.empty():
                        more = self._chores.get()
                        if not isinstance(more, Path):
                            held.append(more)
                            break
                        segments.append(more)
                    self._delete(segments)
                else:
                    self._do(work)
            except Exception:  # never let the thread die with chores still coming
                log.exception("journal janitor: %s failed", work)

    def _discard_torn(self) -> None:
        """Undo a failed append: none of its records may come back at recovery (the client was
        told the step was not applied). A short write leaves whole records of the batch in the
        segment, and a failed fsync all of them, so the segment is cut back to its length
        before the batch (`_size`); ftruncate frees blocks, so it works on a full disk. Where
        the cut fails too (an I/O error, a read-only remount), the segment is renamed to
        `<sequence>.<length before the batch>.log`: a rename needs no data block, and recovery
        reads such a segment only up to that length. If both fail the disk takes no change at
        all, and a crash may bring the batch back: logged. Either way the segment is closed and
        the next append starts a new one."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:  # the roll failed: nothing of the batch was written
                return
            try:
                os.ftruncate(fd, self._size)
            except OSError as exc:
                self._mark_valid_length(exc)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _mark_valid_length(self, cut_failed: OSError) -> None:
        """Rename the segment being written to carry its valid length (see `_discard_torn`)."""
        path = self.directory / f"{self._seq:012d}.log"
        marked = self.directory / f"{self._seq:012d}.{self._size}.log"
        try:
            os.rename(path, marked)
        except OSError as exc:
            log.critical("journal segment %s holds a refused batch that could not be cut "
                         "(%s) nor marked (%s): a crash now would replay it", path,
                         cut_failed, exc)  # fmt: skip
            return
        self._torn_names[self._seq] = marked

    def _write_held(self, seq: int, records: dict[str, list[bytes]]) -> None:
        """Write (or replace) the held segment `seq` whole: a temporary file, synced, renamed
        over it, so a crash finds the old contents or the new, never a part."""
        path = self.directory / f"{seq:012d}.log"
        temporary = path.with_suffix(".held")
        durable = self._fsync != "never"
        try:
            data = b"".join(b"".join(r) for r in records.values())
            write_file(str(temporary), data, durable, mode=0o600)  # as every segment
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        if durable:
            fsync_dir(self.directory)

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                m = _SEGMENT_RE.fullmatch(entry.name)
                if m:
                    found.append((int(m.group(1)), Path(entry.path)))
        return sorted(found)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except OSError as exc:
                log.error("journal fsync failed: %s", exc)


def _valid_length(segment: Path) -> int | None:
    """How many bytes of `segment` count: all (None), or what its name says (`_discard_torn`)."""
    m = _SEGMENT_RE.fullmatch(segment.name)
    return int(m.group(2)) if m is not None and m.group(2) is not None else None


def _close_segment(work: int) -> None:
    """fsync and close a full segment's descriptor."""
    with contextlib.suppress(OSError):
        os.fsync(work)
    with contextlib.suppress(OSError):
        os.close(work)

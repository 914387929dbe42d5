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
own (`hold`, `held_records`), which trimming passes over. Its records go when its owner closes
it (`release`).

Appends run on the event loop; the slow file work does not. A full segment's final fsync and
close are done by the fsync thread (interval policy: before it syncs anything newer, so the
journal stays a prefix of what was written) or by the janitor (`journal_janitor`; the others:
their records are synced by `append`, or never), and the deletion of segments nobody needs by
the janitor, in order. A crash before it gets to them leaves a segment that recovery reads and
skips (its records are older than the checkpoints that replaced them). The segment files'
names and whole-file work are `journal_segments`'s; reading them at start-up (what is a crash's
and dropped, what is damage) is `journal_opening`'s.

A segment's END records say, until it is deleted, why those sessions ended; a late request
learns that from the journal's `ended` file after that (`ended_file`): the ends noted since the
start (`note_end`) are appended to it before the segments holding them are deleted (all of
them by a shutdown's `drop_before`).

Before a segment is deleted, the checkpoints that released it are flushed to disk
(`checkpoints_flush`), so a power loss finds each session's steps in a checkpoint or still in
the journal; not under the `never` policy, which promises nothing past a killed process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from service.errors import JournalUnavailable
from service.sessions.checkpoints_flush import CheckpointsFlush
from service.sessions.ended_file import Ended, EndedFile
from service.sessions.held_records import HeldRecords
from service.sessions.journal_janitor import JournalJanitor
from service.sessions.journal_opening import SegmentReading
from service.sessions.journal_record import JournalRecord
from service.sessions.journal_scan import Unreadable
from service.sessions.journal_segments import (
    clear_stray_held,
    close_segment,
    list_segments,
    mark_valid_length,
    segment_path,
    sequence_of,
)
from service.sessions.write_probe import takes_writes
from service.settings import SPILL_DIR_VARIABLE

log = logging.getLogger(__name__)

FsyncPolicy = Literal["batch", "interval", "never"]


class Journal:
    def __init__(
        self,
        directory: Path,
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval_seconds: float = 0.2,
        segment_bytes: int = 64 * 1024 * 1024,
        checkpoints: Path | None = None,
        setting: str = SPILL_DIR_VARIABLE,
    ) -> None:
        self.directory = Path(directory)
        self._setting = setting  # what set the state directory, named when a write fails
        self._fsync = fsync
        # The checkpoints that release segments, flushed before a deletion.
        self._checkpoints_flushed = CheckpointsFlush(checkpoints if fsync != "never" else None)
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
        # Closes full segments and deletes those nobody needs, in order (`_delete`, late-bound).
        self._janitor = JournalJanitor(lambda segments: self._delete(segments))
        # With the fsync thread: full segments' descriptors it has yet to fsync, oldest first
        # (under `_lock`). It fsyncs them before the segment being written, so no newer record
        # is made durable before an older one.
        self._retired: list[int] = []
        self.failed_writes = 0  # appends refused because the disk would not take them
        self.refused_bytes = 0  # the size of the last batch refused (what a probe asks room for)
        self._damaged = 0  # records `open` found damaged (not a crash's torn last one)
        self._failing = False
        # Segments whose file is not `<sequence>.log`: renamed by `_discard_torn`, or found so
        # by `open` (deleted by sequence, as any other).
        self._torn_names: dict[int, Path] = {}
        self._held = HeldRecords(self.directory, durable=fsync != "never")  # `hold`
        # Why sessions ended, kept past their END records (`note_end`, `ended_sessions`).
        self._ended = EndedFile(self.directory, durable=fsync != "never")
        self._started = False  # ends are noted once writing begins (before: `keep_ended`)

    @property
    def segment(self) -> int:
        return self._seq

    @property
    def damaged_records(self) -> int:
        """Records `open` found damaged (not a crash's torn last one), and ended file lines."""
        return self._damaged + self._ended.damaged

    @property
    def refusing(self) -> bool:
        """Whether the last append failed: the disk refuses writes (until one succeeds)."""
        return self._failing

    def probe(self) -> bool:
        """Whether the directory takes as much as the batch last refused now (`write_probe`;
        blocking: run it on a thread)."""
        return takes_writes(self.directory, self.refused_bytes)

    def writes_again(self) -> None:
        """A probe found that the disk takes writes again (`probe`): no longer refusing."""
        if self._failing:
            self._failing = False
            log.warning("journal's directory takes writes again (probed) after %d failed "
                        "appends", self.failed_writes)  # fmt: skip

    # ---- start and stop --------------------------------------------------------------------

    def open(self) -> Iterator[JournalRecord | Unreadable]:
        """Every record the segments on disk hold, oldest first (for recovery), and in its place
        each damaged one (`Unreadable`: logged, counted in `damaged_records`); what is dropped
        and what is damage is `journal_opening`'s. Writing starts in a new segment once
        `start()` is called."""
        self.directory.mkdir(parents=True, exist_ok=True)
        clear_stray_held(self.directory)
        segments = list_segments(self.directory)
        if segments:
            self._seq = max(self._seq, segments[-1][0])
            self.oldest = self.oldest or segments[0][0]
        reading = SegmentReading(self.directory, self._torn_names)
        try:
            yield from reading.records(segments)
        finally:
            self._damaged += reading.damaged_records

    def ended_sessions(self) -> list[Ended]:
        """The ends kept past their END records (session id, why, owner), oldest first; what
        is readable of a damaged file (logged, counted in `damaged_records`)."""
        return self._ended.read()

    def keep_ended(self, ended: list[Ended]) -> None:
        """Keep `ended` (all the process remembers once recovery read the journal's ENDs, oldest
        first) before `drop_before` deletes the segments read."""
        self._ended.rewrite(ended)

    def note_end(self, session_id: str, why: str, owner: str) -> None:
        """A session ended: kept in the ended file once the segment being written is deleted
        (before `start`, an end recovery read: `keep_ended`'s)."""
        if self._started:
            self._ended.note(self._seq, (session_id, why, owner))

    def start(self) -> None:
        """Begin writing (a fresh segment); start the janitor and, for the interval policy, the
        fsync thread."""
        self._roll()
        self._started = True
        self._checkpoints_flushed.open()
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
        old = [(n, p) for n, p in list_segments(self.directory) if n < seq and n != self._held.seq]
        if old and self._checkpoints_flushed():
            self._ended.carry(old[-1][0])  # their ENDs' answers first
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
        if self._fd is not None or self._held.seq or not records:
            return False
        if not self._held.hold(self._seq + 1, records):
            return False
        self._seq = self._held.seq  # `start` writes the next one
        return True

    def release(self, session_id: str) -> None:
        """A held session was closed (its END journaled first): its records go, and the held
        segment with the last of them. Held records of a closed session must not outlive its
        END, whose segment is trimmed: they would bring it back after a restart."""
        try:
            unneeded = self._held.release(session_id)
        except OSError as exc:
            log.error("could not drop the held records of closed session %s (%s): the "
                      "journal keeps its END's segment and all after it",
                      session_id, exc)  # fmt: skip
            self.pin(self._seq)
            return
        if unneeded is not None:
            self._janitor.hand(unneeded)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=5)
        janitor_busy = self._janitor.stop()
        self._ended.carry(0)  # ends a refused append kept noted: their segments may be gone
        with self._lock:
            self._finish_retired()
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
        self._checkpoints_flushed.close(in_use=janitor_busy)

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
            self.refused_bytes = len(data)
            if not self._failing:
                self._failing = True
                log.error("journal writes failing: %s (%s)", exc.strerror or exc, self.directory)
            raise JournalUnavailable(
                f"session state cannot be made durable: {exc.strerror or 'write failed'} "
                f"(the state directory, {self._setting}); the step was not applied, retry later"
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
            if n != self._held.seq:
                torn = self._torn_names.pop(n, None)
                self._janitor.hand(torn or segment_path(self.directory, n))
            self._trimmed_below += 1

    def settle(self) -> None:
        """Wait until the janitor has done what it was handed (fsyncs, closes, deletions)."""
        self._janitor.settle()

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
            close_segment(fd)

    def _roll(self) -> None:
        with self._lock:
            full, self._fd = self._fd, None
            try:
                self._seq += 1
                path = segment_path(self.directory, self._seq)
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._size = 0
            finally:  # the full segment's last fsync and close, even when no new one opened
                if full is not None and self._syncer is not None and self._syncer.is_alive():
                    self._retired.append(full)  # the fsync thread's, before anything newer
                elif full is not None:
                    self._janitor.hand(full)

    def _delete(self, segments: list[Path]) -> None:
        """Delete `segments`, after one flush of the checkpoints for all of them, and the ends
        noted up to the newest of them appended to the ended file (deleted all the same when
        the disk refuses that: the ends stay noted)."""
        if self._checkpoints_flushed():
            self._ended.carry(max(sequence_of(path) for path in segments))
            for path in segments:
                with contextlib.suppress(OSError):
                    path.unlink()

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
                marked = mark_valid_length(self.directory, self._seq, self._size, exc)
                if marked is not None:
                    self._torn_names[self._seq] = marked
            with contextlib.suppress(OSError):
                os.close(fd)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except OSError as exc:
                log.error("journal fsync failed: %s", exc)

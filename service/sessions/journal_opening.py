"""Reading the journal's segments at start-up (`Journal.open`): which unreadable stretches are
a crash's and dropped, and which are damage.

The newest segment's unreadable end is a crash's or a power loss's: a record cut short (a
write a crash interrupted: only noted), or a whole last record failing its checksum, or zeros
where the last records were (a write a power loss caught before it was synced, so never
acknowledged: warned and counted). Either is dropped and
cut off the segment, so a later start, with newer segments after it, does not take that end
for damage. In an older segment either was followed by newer segments, so it was synced whole:
damage, passed on to recovery (its session lost a step), as is every unreadable stretch that
whole records follow. A record a newer server wrote is passed on too, not counted: recovery
refuses its session (written by a newer seqserve) and keeps its records; one whose head names
no session is skipped (logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from service.sessions.journal_record import JournalRecord
from service.sessions.journal_scan import DAMAGED, NEWER, TAIL, TORN, Unreadable, read_stream
from service.sessions.journal_segments import mark_valid_length, valid_length

log = logging.getLogger("service.sessions.journal")  # the journal's own log, as before the split


class SegmentReading:
    def __init__(self, directory: Path, torn_names: dict[int, Path]) -> None:
        self.directory = directory
        # The journal's: segments whose file is not `<sequence>.log` (marked with their valid
        # length), found here or made here when a cut fails.
        self._torn_names = torn_names
        self.damaged_records = 0  # counted as they are read

    def records(self, segments: list[tuple[int, Path]]) -> Iterator[JournalRecord | Unreadable]:
        """Every record of `segments` (oldest first), and in its place each damaged one."""
        for seq, path in segments:
            valid = valid_length(path)
            if valid is not None:
                self._torn_names[seq] = path
            data = path.read_bytes()
            newest = seq == segments[-1][0]  # the one a crash or power loss may have left cut
            for item in read_stream(data if valid is None else data[:valid]):
                if isinstance(item, Unreadable):
                    if item.what in (TORN, TAIL) and not newest:  # newer segments followed it:
                        item = item._replace(what=DAMAGED)  # it was synced, whole
                    if not self._note(path, item):
                        if newest and item.what in (TORN, TAIL):
                            path = self._cut(seq, path, item.offset)
                        continue  # a crash's cut write, a newer server's nameless record
                yield item

    def _note(self, path: Path, bad: Unreadable) -> bool:
        """Log what `open` could not read in segment `path`; True for what is passed on to
        recovery: damage (counted: its session lost a step) and a newer server's record of a
        session its head names (not counted: recovery refuses that session and says so); False
        for what is dropped: a crash's torn last write, a whole last record failing its checksum
        (counted), a newer server's record that names no session."""
        named = ""
        if bad.session_id:  # what its head says: the damage may be there too
            named = f", apparently session {bad.session_id}'s at position {bad.position}"
        if bad.what == TORN:
            log.info("journal segment %s ends in a record cut short at offset %d (a write a "
                     "crash interrupted): dropped", path, bad.offset)  # fmt: skip
            return False
        if bad.what == NEWER:
            if bad.session_id:
                return True
            log.warning("journal segment %s: the record at offset %d was written by a newer "
                        "server and names no session: skipped", path, bad.offset)  # fmt: skip
            return False
        self.damaged_records += 1
        if bad.what == TAIL:
            log.warning("journal segment %s ends in a whole record that fails its checksum, or "
                        "in bytes no record begins with (zeros), at offset %d%s (a write a "
                        "power loss caught before it was synced, so never acknowledged, or "
                        "damage; a crash leaves neither): dropped, its session comes back "
                        "before it", path, bad.offset, named)  # fmt: skip
            return False
        log.warning("journal segment %s: the record at offset %d is damaged (whole records "
                    "follow it)%s: skipped", path, bad.offset, named)  # fmt: skip
        return True

    def _cut(self, seq: int, path: Path, size: int) -> Path:
        """Cut segment `seq` back to its first `size` bytes, the end a crash left unreadable:
        once newer segments follow it, a later start must not take that end for damage. Where
        the cut fails, the segment is marked instead (`mark_valid_length`); its path now."""
        try:
            with open(path, "r+b") as segment:
                segment.truncate(size)
                os.fsync(segment.fileno())
        except OSError as exc:
            if valid_length(path) is None:
                marked = mark_valid_length(self.directory, seq, size, exc)
                if marked is not None:
                    self._torn_names[seq] = path = marked
        return path

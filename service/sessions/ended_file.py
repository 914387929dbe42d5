"""The ended sessions' answers kept on disk, where the journal's END records no longer are: the
file `ended` in the journal's directory.

A late request for a session that ended (closed, expired, moved) learns which, after any number
of restarts (`EndedSessions`). An END record says so only until its segment is deleted, and a
clean stop deletes them all; so before a segment goes, the ends journaled up to it (noted here
as they happen, with their owners) are appended to this file (`carry`), and a start, once
recovery has read the journal, writes the file anew from what the process remembers
(`rewrite`): the file's entries and the journal's ENDs, the newest `REMEMBERED` of them.

One line an end, `<crc32 hex> <session id> <why> <owner as a JSON string>`, the checksum over
what follows it: a line cut short (a crash during an append: its segments were not deleted,
so the journal still has those ends) is dropped, a damaged one skipped, logged and counted
(`damaged`); neither stops a start, whose requests for those ids then hear NOT_FOUND. Appends
grow it to twice the bound at most: then it is written anew, each id once, the newest kept. A
whole write goes through `ended.tmp`, synced and renamed over it. No pickle.

Noting an end is a deque append under a lock, on the event loop; the file work is done by the
journal's janitor thread or at start and stop, never on a step's path. Where the disk refuses
an append, the segments are deleted all the same (their space may be what the disk lacks) and
the ends stay noted for the next append or the shutdown's; a crash before then loses only
those answers (NOT_FOUND), never a session.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import zlib
from collections import OrderedDict, deque
from pathlib import Path

from service.sessions.ended_sessions import REMEMBERED
from service.sessions.record_files import append_file, fsync_dir, read_file, replace_file
from service.sessions.session import SESSION_ID_PATTERN

log = logging.getLogger(__name__)

ENDED_FILE = "ended"
WHYS = frozenset(("closed", "expired", "moved"))  # what a late request is told (not "lost")
_ID_RE = re.compile(SESSION_ID_PATTERN)

Ended = tuple[str, str, str]  # session id, why it ended, its owner ("" when unknown)


def line(entry: Ended) -> bytes:
    session_id, why, owner = entry
    body = f"{session_id} {why} {json.dumps(owner)}".encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def parse(raw: bytes) -> Ended | None:
    """The end a line holds; None when it is damaged."""
    try:
        crc, body = raw.split(b" ", 1)
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
            return None
        session_id, why, quoted = body.decode("ascii").split(" ", 2)
        if "\\" in quoted or len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
            owner = json.loads(quoted)  # escapes to undo (or damage): JSON's to read
        else:
            owner = quoted[1:-1]  # the usual name: as written (3x faster at 100,000 lines)
    except ValueError:  # too few fields, not hex, not ASCII, not JSON
        return None
    if not (why in WHYS and isinstance(owner, str) and _ID_RE.fullmatch(session_id)):
        return None
    return session_id, why, owner


class EndedFile:
    def __init__(self, directory: Path, *, durable: bool, bound: int = REMEMBERED) -> None:
        self.path = Path(directory) / ENDED_FILE
        self._durable = durable  # fsync what is written (not under the `never` policy)
        self._bound = bound
        self.damaged = 0  # lines found damaged (read at a start, or at a compaction)
        self._lock = threading.Lock()  # `_pending`: noted on the event loop, taken by threads
        self._pending: deque[tuple[int, Ended]] = deque()  # (its END's segment, the end)
        self._writing = threading.Lock()  # one writer of the file at a time
        self._lines = 0  # lines in the file (a compaction is due past twice the bound)
        self._torn_tail = False  # it may end in a part of a line: an append starts a new one
        self._read: list[Ended] | None = None  # what `read` found, when the file is just that
        self._unread = False  # `read` could not read it: kept, never replaced, by this process
        self._dir_synced = False  # the file's name made durable by this process (once)

    def read(self) -> list[Ended]:
        """The ends the file keeps, oldest first, each id once (its last line), the newest
        `bound`. A missing file keeps none; an unreadable one, or damaged lines, are logged
        and counted, and the rest is read."""
        try:
            data = read_file(str(self.path))
        except FileNotFoundError:
            self._read = []
            return []
        except OSError as exc:
            log.warning("could not read %s (%s): requests for the sessions that ended before "
                        "it was written hear NOT_FOUND until a restart reads it; it is kept, "
                        "and appended to", self.path, exc)  # fmt: skip
            self._torn_tail = True
            self._unread = True
            return []
        found, lines = self._entries(data, at_start=True)
        self._lines = lines
        if len(found) == lines and not self._torn_tail:  # nothing to drop: no rewrite needed
            self._read = found
        return found

    def rewrite(self, ended: list[Ended]) -> bool:
        """Make the file hold `ended` (oldest first), whole, unless it does already. False when
        the disk refused (logged): they are noted, to be appended with the next carry."""
        ended = [e for e in ended if e[1] in WHYS][-self._bound :]
        with self._writing:
            if ended == self._read:
                return True
            if self._unread:  # what it holds may be readable again later: not replaced
                self._requeue(ended)  # appended with the next carry
                return True
            self._read = None
            try:
                self._write_whole(ended)
            except OSError as exc:
                log.error("could not write %s (%s): the ends it would keep are appended when "
                          "the disk takes them", self.path, exc)  # fmt: skip
                self._requeue(ended)
                return False
        return True

    def note(self, segment: int, entry: Ended) -> None:
        """A session ended; its END record is in `segment` (or none was written): kept here once
        that segment is deleted (`carry`). The newest `bound` noted are kept."""
        if entry[1] not in WHYS:
            return
        with self._lock:
            self._pending.append((segment, entry))
            if len(self._pending) > self._bound:
                self._pending.popleft()

    def carry(self, upto: int | None) -> bool:
        """Append the ends noted for segments up to `upto` (None: all) and sync them: those
        segments may go. False when the disk refused (logged; they stay noted)."""
        with self._writing:
            with self._lock:
                batch: list[Ended] = []
                while self._pending and (upto is None or self._pending[0][0] <= upto):
                    batch.append(self._pending.popleft()[1])
            if not batch:
                return True
            self._read = None
            try:
                self._append(batch)
            except OSError as exc:
                self._torn_tail = True  # a part of the batch may have been written
                log.error("could not append to %s (%s): the answers for %d ended sessions are "
                          "kept in memory until it can be (a crash meanwhile loses them: "
                          "NOT_FOUND)", self.path, exc, len(batch))  # fmt: skip
                self._requeue(batch)
                return False
            if self._lines > 2 * self._bound:
                self._compact()
        return True

    # ---- internals -------------------------------------------------------------------------

    def _entries(self, data: bytes, *, at_start: bool) -> tuple[list[Ended], int]:
        """The ends `data` holds (each id once, at its last line, the newest `bound`), and how
        many lines it has. A torn last line is dropped; damaged ones are counted."""
        lines = data.split(b"\n")
        tail = lines.pop()  # what follows the last newline: b"" unless a write was cut short
        if tail:
            self._torn_tail = True
            if at_start:
                log.info("%s ends in a line cut short (an append a crash interrupted): "
                         "dropped", self.path)  # fmt: skip
        found: OrderedDict[str, Ended] = OrderedDict()
        bad = 0
        for raw in lines:
            if not raw:
                continue  # where an append followed a cut-short line
            entry = parse(raw)
            if entry is None:
                bad += 1
                continue
            found[entry[0]] = entry
            found.move_to_end(entry[0])
        if bad:
            self.damaged += bad
            log.warning("%s: %d damaged lines skipped (late requests for those sessions hear "
                        "NOT_FOUND)", self.path, bad)  # fmt: skip
        return list(found.values())[-self._bound :], len(lines)

    def _append(self, batch: list[Ended]) -> None:
        data = b"".join(map(line, batch))
        if self._torn_tail:
            data = b"\n" + data  # the next line starts on a line of its own
        new = not self.path.exists()
        append_file(str(self.path), data, self._durable, mode=0o600)
        if (new or not self._dir_synced) and self._durable:
            fsync_dir(self.path.parent)  # again at the next append if this one failed
            self._dir_synced = True
        self._torn_tail = False
        self._lines += len(batch)

    def _compact(self) -> None:
        """The file written anew, each id once (its newest line), the newest `bound`."""
        try:
            found, _ = self._entries(read_file(str(self.path)), at_start=False)
            self._write_whole(found)
        except OSError as exc:
            log.error("could not compact %s (%s); tried again at the next append",
                      self.path, exc)  # fmt: skip

    def _write_whole(self, ended: list[Ended]) -> None:
        """`ended` as the whole file: a temporary file, synced, renamed over it. Raises
        OSError (the file is left as it was)."""
        temporary = self.path.with_name(f"{ENDED_FILE}.tmp")
        replace_file(self.path, temporary, b"".join(map(line, ended)), self._durable, 0o600)
        self._dir_synced = self._dir_synced or self._durable
        self._lines = len(ended)
        self._torn_tail = False

    def _requeue(self, ended: list[Ended]) -> None:
        """Ends the disk refused, noted again before the rest (appended at the next carry)."""
        with self._lock:
            self._pending.extendleft((0, entry) for entry in reversed(ended))
            while len(self._pending) > self._bound:
                self._pending.popleft()

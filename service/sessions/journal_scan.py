"""Reading a journal segment back: its records in order, and what stands in the way of each
stretch of bytes that is not one (`Unreadable`). The record format is `journal_record`'s.

Later versions keep the frame and the body's head (`journal_record`), so a whole record
whose checksum is good and whose version is above this server's is a newer seqserve's, not
damage, and its head still says whose it is: `read_stream` reports it (`NEWER`, with its session,
position and the whole frame, `raw`), and recovery refuses that session rather than bring it
back short of that step, keeping the frame as it is for a server of that version.

A torn last record (shorter than its length says, with nothing whole after it) is what a crash
in the middle of a write leaves: normal. A whole last record whose checksum fails is what a
power loss leaves when the file's length reached the disk before all of its bytes (the write
was not yet synced, so its step was never acknowledged), or damage after the fact, and so is a
last stretch whose length no record has (above all zeros: the last records' length reached the
disk, their bytes did not; no crash leaves that). The two cannot be told apart, so it is
reported (`TAIL`) and dropped, as a database's log ends at its
first bad checksum. Anything else unreadable is damage: bytes that whole records follow. (Only
the newest segment's end can be a crash's or a power loss's: `Journal.open` takes an older
one's for damage.)
`read_stream` reports each in place (`Unreadable`), with what the record's head still says
(its session and position), so recovery can tell the session it was for that a step is lost.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from service.sessions.journal_record import (
    FRAME,
    GEN_START,
    HEAD,
    POSITION,
    READABLE,
    TOKENS,
    VERSION,
    JournalRecord,
    decode_at,
)
from service.sessions.session import SESSION_ID_PATTERN

# Where a body can begin: a readable version byte, then a known kind (what `_resync` looks for).
_BODY_START = re.compile(
    b"[%s][%s]" % tuple(re.escape(bytes(v)) for v in (READABLE, range(TOKENS, GEN_START + 1)))
)
# Where a newer server's body can begin (`_resync` stops there too): a version above ours, any
# kind, then its session id's length and the id's first bytes (every id begins "s_", and every
# format keeps that head: `journal_record`).
_NEWER_START = re.compile(b"[%s-\xff].[\x03-\xff]s_" % re.escape(bytes([VERSION + 1])), re.DOTALL)
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


# What `Unreadable` found: a crash's torn last write, a whole last record failing its checksum
# (a power loss's unsynced write, or damage), damage, or a newer server's record.
TORN, TAIL, DAMAGED, NEWER = "torn", "tail", "damaged", "newer"


class Unreadable(NamedTuple):
    """Bytes of a segment that hold no readable record, where `read_stream` met them."""

    offset: int  # where the record that could not be read begins
    what: str  # TORN, TAIL, DAMAGED or NEWER
    # What a damaged record's head still says, when it reads as one (the damage may be there
    # too, so a guess): its session ("" when unreadable), position and kind.
    session_id: str = ""
    position: int = 0
    kind: int = 0
    raw: bytes = b""  # NEWER: the whole frame, as the newer server wrote it


def decode_stream(data: bytes) -> Iterator[JournalRecord]:
    """The records of one segment, in order. A damaged record is skipped: reading resumes at
    the next offset where a whole record checks out (the damaged session's later records then
    show a gap, which recovery refuses with DATA_LOSS); a torn last record is simply the end."""
    for item in read_stream(data):
        if isinstance(item, JournalRecord):
            yield item


def read_stream(data: bytes) -> Iterator[JournalRecord | Unreadable]:
    """`decode_stream`, with an `Unreadable` in place of each stretch of bytes it skips."""
    offset, size = 0, len(data)
    while offset + FRAME.size <= size:
        record, end_at = decode_at(data, offset)
        if record is None:
            newer = _newer_at(data, offset)
            if newer is not None:  # whole: reading goes on right after it
                yield newer
                offset += len(newer.raw)
                continue
            resumed = _resync(data, offset + 1)
            yield _unreadable(data, offset, whole_after=resumed < size)
            offset = resumed
            continue
        yield record
        offset = end_at
    if offset < size:  # less than a frame's head: a write cut short
        yield Unreadable(offset, TORN)


def _newer_at(data: bytes, offset: int) -> Unreadable | None:
    """The record at `offset` as a newer server's (`NEWER`), when it is one: whole, its
    checksum good, its version above this server's. Its head names its session, as every
    version's does (`journal_record`'s docstring); "" where it does not read so."""
    length, crc = FRAME.unpack_from(data, offset)
    start = offset + FRAME.size
    end = start + length
    if not HEAD.size + POSITION.size <= length <= len(data) - start:
        return None
    if data[start] <= VERSION or zlib.crc32(memoryview(data)[start:end]) != crc:
        return None
    session_id, position = _named(data, start, end)
    kind = data[start + 1]
    return Unreadable(offset, NEWER, session_id, position, kind, bytes(data[offset:end]))


def _unreadable(data: bytes, offset: int, *, whole_after: bool) -> Unreadable:
    """Why the record at `offset` cannot be read (a newer server's is `_newer_at`'s). Torn:
    shorter than its length says, and no whole record after it (a crash cut its write short).
    Tail: the last, and whole but failing its checksum, or with a length no record has, as
    zeros read (a power loss's unsynced write, or damage).
    Any bytes whole records follow are damage, as is a whole one that checks out but will not
    parse."""
    length, crc = FRAME.unpack_from(data, offset)
    start = offset + FRAME.size
    whole = HEAD.size + POSITION.size <= length <= len(data) - start
    # Only a length running past the end is a crash's: what a write cut short leaves is a prefix
    # of its bytes, and one that holds a whole frame holds its real length. A length no record
    # has (zeros, above all: the last records' length reached the disk before their bytes) is a
    # power loss's or damage, never a crash's.
    cut_short = length > len(data) - start
    if cut_short and not whole_after:  # its head may still name it (an older segment's: damage)
        return Unreadable(offset, TORN, *_head_of(data, start))
    checks_out = whole and zlib.crc32(memoryview(data)[start : start + length]) == crc
    what = TAIL if not checks_out and not whole_after else DAMAGED
    return Unreadable(offset, what, *_head_of(data, start))


def _head_of(data: bytes, start: int) -> tuple[str, int, int]:
    """(session id, position, kind) of the body at `start`, when its head reads as a record's:
    a readable version, a known kind, a well-formed session id. ("", 0, 0) when not."""
    if start + HEAD.size > len(data):
        return "", 0, 0
    version, kind = data[start], data[start + 1]
    if version not in READABLE or not TOKENS <= kind <= GEN_START:
        return "", 0, 0
    session_id, position = _named(data, start, len(data))
    return (session_id, position, kind) if session_id else ("", 0, 0)


def _named(data: bytes, start: int, end: int) -> tuple[str, int]:
    """The session id and position the head of the body at `start` names, read no further
    than `end` (the head every version keeps: `journal_record`); ("", 0) when they do not
    read as a session's."""
    sid_len = data[start + 2]
    at = start + HEAD.size
    if at + sid_len + POSITION.size > end:
        return "", 0
    name = data[at : at + sid_len].decode("ascii", errors="replace")
    if not _SESSION_ID.fullmatch(name):
        return "", 0
    (position,) = POSITION.unpack_from(data, at + sid_len)
    return name, position


def _resync(data: bytes, offset: int) -> int:
    """The next offset at or after `offset` where a whole record checks out, readable or a
    newer server's (`_newer_at`: skipping it would bring its session back short), or the end.
    Only offsets whose body would begin with a readable version and a known kind, or with a
    newer version and a session id, are tried (every whole record's does): `decode_at` at
    every byte of a damaged 4 MB feed took 32 s. The next readable start found is kept while
    the search passes false newer ones before it: searched again after each, a stretch of
    them scanned on to the same start every time."""
    size = len(data)
    end = -1  # where the next readable body may begin, found from before `offset` (size: none)
    while offset + FRAME.size <= size:
        if end < offset + FRAME.size:
            readable = _BODY_START.search(data, offset + FRAME.size)
            end = readable.start() if readable is not None else size
        newer = _NEWER_START.search(data, offset + FRAME.size, end)
        if newer is not None:
            offset = newer.start() - FRAME.size
            if _newer_at(data, offset) is not None:
                return offset
        elif end == size:
            break
        else:
            offset = end - FRAME.size
            if decode_at(data, offset)[0] is not None:
                return offset
        offset += 1
    return size

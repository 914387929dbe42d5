"""Journal records: what each acknowledged step fed a session, as self-checking bytes.

A record is framed as

    length   4 bytes, unsigned little-endian: the body's length
    crc32    4 bytes, unsigned little-endian: zlib.crc32 of the body
    body     version (1 byte), kind (1 byte), session id (1-byte length, ASCII),
             the session's position before the record (8 bytes),
             [version 2] the request id that applied it (1-byte length, UTF-8),
             then the kind's payload:
             TOKENS     [v2: top_k (2 bytes), per_position (1 byte)] count (4 bytes), int32 ids
             FRAMES     [v2: top_k (2 bytes), per_position (1 byte)] count (4), float32 values
             GENERATED  the sampled token (int32), the RNG draws it took (1 byte)
             GEN_START  JSON (the rest of the body): the generation's sampling
             CREATE     JSON (the rest of the body): model, version, seed, sampling, ...
             END        why, then a newline and the session's owner when it has one (the rest
                        of the body, UTF-8): "closed", "expired\nalice"

Version 2 adds the request id and a feed's prediction options, so recovery can rebuild the
reply to a session's last request for an exactly-once retry. This server writes version 2 and
reads both (tests/sessions/fixtures holds version 1 records). No pickle. A record that fails
its checksum is never applied: reading resumes at the next whole record; a torn last record is
the end of its segment.

Later versions keep the frame and the body's head as versions 1 and 2 have them: the version
byte, a kind byte, the session id (its length, then ASCII) and the position. So a whole record
whose checksum is good and whose version is above this server's is a newer seqserve's, not
damage, and its head still says whose it is: `read_stream` reports it (`NEWER`, with its session,
position and the whole frame, `raw`), and recovery refuses that session rather than bring it
back short of that step, keeping the frame as it is for a server of that version.

A torn last record (shorter than its length says, with nothing whole after it) is what a crash
in the middle of a write leaves: normal. A whole last record whose checksum fails is what a
power loss leaves when the file's length reached the disk before all of its bytes (the write
was not yet synced, so its step was never acknowledged), or damage after the fact: the two
cannot be told apart, so it is reported (`TAIL`) and dropped, as a database's log ends at its
first bad checksum. Anything else unreadable is damage: bytes that whole records follow. (Only
the newest segment's end can be a crash's or a power loss's: `Journal.open` takes an older
one's for damage.)
`read_stream` reports each in place (`Unreadable`), with what the record's head still says
(its session and position), so recovery can tell the session it was for that a step is lost.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from service.sessions.session import SESSION_ID_PATTERN

VERSION = 2  # what this server writes
READABLE = (1, 2)
TOKENS, FRAMES, GENERATED, CREATE, END, GEN_START = 1, 2, 3, 4, 5, 6
MAX_REQUEST_ID = 255  # bytes of a request id a record can carry
_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<BBB")  # version, kind, session id length
_POSITION = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_ONE = struct.Struct("<Ii")  # a count of one, and the int32 id
_OPTIONS = struct.Struct("<HB")  # top_k, per_position
_GENERATED = struct.Struct("<iB")
_INT32 = np.dtype("<i4")
_FLOAT32 = np.dtype("<f4")
# Where a body can begin: a readable version byte, then a known kind (what `_resync` looks for).
_BODY_START = re.compile(
    b"[%s][%s]" % tuple(re.escape(bytes(v)) for v in (READABLE, range(TOKENS, GEN_START + 1)))
)
# Where a newer server's body can begin (`_resync` stops there too): a version above ours, any
# kind, then its session id's length and the id's first bytes (every id begins "s_", and every
# format keeps that head, the module's docstring).
_NEWER_START = re.compile(b"[%s-\xff].[\x03-\xff]s_" % re.escape(bytes([VERSION + 1])), re.DOTALL)
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


class JournalRecord(NamedTuple):
    """One decoded record. A tuple, not a dataclass: recovery decodes millions of them."""

    kind: int
    session_id: str
    position: int  # the session's position before this record
    data: bytes = b""  # TOKENS, GENERATED: int32 ids; FRAMES: float32 values
    n: int = 0  # values in `data`
    draws: int = 0  # GENERATED: uniform numbers its sampling took from the session's RNG
    # CREATE: the session; GEN_START: the sampling; END: {"owner": ...} when it names one
    meta: dict[str, Any] | None = None
    why: str = ""  # END
    request_id: str = ""  # the request that applied it ("" in version 1)
    top_k: int = 0  # TOKENS, FRAMES: the feed's prediction options (version 2)
    per_position: bool = False

    @property
    def tokens(self) -> np.ndarray | None:
        if self.kind not in (TOKENS, GENERATED):
            return None
        return np.frombuffer(self.data, dtype=_INT32)

    @property
    def frames(self) -> np.ndarray | None:
        return np.frombuffer(self.data, dtype=_FLOAT32) if self.kind == FRAMES else None

    @property
    def consumed(self) -> int:
        """Inputs this record fed (frames count in values; the caller divides by the dim)."""
        return self.n if self.kind in (TOKENS, GENERATED) else 0


def _frame(body: bytes) -> bytes:
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _ids(kind: int, session_id: str, request_id: str) -> tuple[bytes, bytes]:
    """A body's head around its position: version, kind and session id before it, the request
    id after it."""
    sid = session_id.encode("ascii")
    rid = request_id.encode("utf-8")[:MAX_REQUEST_ID]
    return _HEAD.pack(VERSION, kind, len(sid)) + sid, bytes([len(rid)]) + rid


def _head(kind: int, session_id: str, position: int, request_id: str = "") -> bytes:
    before, after = _ids(kind, session_id, request_id)
    return before + _POSITION.pack(position) + after


def tokens(
    session_id: str,
    position: int,
    ids: np.ndarray,
    request_id: str = "",
    top_k: int = 0,
    per_position: bool = False,
) -> bytes:
    data = np.ascontiguousarray(ids, dtype=_INT32)
    options = _OPTIONS.pack(min(top_k, 0xFFFF), per_position)
    head = _head(TOKENS, session_id, position, request_id)
    return _frame(head + options + _COUNT.pack(data.size) + data.tobytes())


def one_token(
    session_id: str,
    position: int,
    token: int,
    request_id: str = "",
    top_k: int = 0,
    per_position: bool = False,
) -> bytes:
    """`tokens` of a single id, the same bytes, without an array (the streaming hot path)."""
    head = _head(TOKENS, session_id, position, request_id)
    return _frame(head + _OPTIONS.pack(min(top_k, 0xFFFF), per_position) + _ONE.pack(1, token))


def frames(
    session_id: str,
    position: int,
    values: np.ndarray,
    request_id: str = "",
    top_k: int = 0,
    per_position: bool = False,
) -> bytes:
    data = np.ascontiguousarray(values, dtype=_FLOAT32).reshape(-1)
    options = _OPTIONS.pack(min(top_k, 0xFFFF), per_position)
    head = _head(FRAMES, session_id, position, request_id)
    return _frame(head + options + _COUNT.pack(data.size) + data.tobytes())


def generated(
    session_id: str, position: int, token: int, draws: int, request_id: str = ""
) -> bytes:
    head = _head(GENERATED, session_id, position, request_id)
    return _frame(head + _GENERATED.pack(token, draws))


class GeneratedRecords:
    """The `generated` records of one generation (one session, one request id): the ids are
    encoded once, not once a token (one record per generated token). The same bytes as
    `generated`."""

    __slots__ = ("_after", "_before", "request_id")

    def __init__(self, session_id: str, request_id: str) -> None:
        self.request_id = request_id
        self._before, self._after = _ids(GENERATED, session_id, request_id)

    def record(self, position: int, token: int, draws: int) -> bytes:
        return _frame(
            self._before + _POSITION.pack(position) + self._after + _GENERATED.pack(token, draws)
        )


def generation_start(
    session_id: str, position: int, request_id: str, sampling: dict[str, Any]
) -> bytes:
    head = _head(GEN_START, session_id, position, request_id)
    return _frame(head + json.dumps(sampling).encode("utf-8"))


def create(session_id: str, meta: dict[str, Any]) -> bytes:
    return _frame(_head(CREATE, session_id, 0) + json.dumps(meta).encode("utf-8"))


def end(session_id: str, position: int, why: str, owner: str = "") -> bytes:
    """The session ended; `owner` (who it was, with auth on) answers, after a crash that
    left nothing else of it, who may hear why. (A server before this reads the owner as part
    of why, and answers NOT_FOUND for the session.)"""
    body = f"{why}\n{owner}" if owner else why
    return _frame(_head(END, session_id, position) + body.encode("utf-8"))


def session_of(record: bytes) -> str:
    """The session an encoded record (one `_frame`) is for, without decoding the rest."""
    at = _FRAME.size + 2  # past the frame, the version and the kind
    return record[at + 1 : at + 1 + record[at]].decode("ascii")


def kind_of(record: bytes) -> int:
    """An encoded record's kind (TOKENS … GEN_START)."""
    return record[_FRAME.size + 1]


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
    while offset + _FRAME.size <= size:
        record, end_at = _frame_at(data, offset)
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
    version's does (the module's docstring); "" where it does not read so."""
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    end = start + length
    if not _HEAD.size + _POSITION.size <= length <= len(data) - start:
        return None
    if data[start] <= VERSION or zlib.crc32(memoryview(data)[start:end]) != crc:
        return None
    session_id, position = "", 0
    kind, sid_len = data[start + 1], data[start + 2]
    at = start + _HEAD.size
    if at + sid_len + _POSITION.size <= end:
        name = data[at : at + sid_len].decode("ascii", errors="replace")
        if _SESSION_ID.fullmatch(name):
            session_id = name
            (position,) = _POSITION.unpack_from(data, at + sid_len)
    return Unreadable(offset, NEWER, session_id, position, kind, bytes(data[offset:end]))


def _unreadable(data: bytes, offset: int, *, whole_after: bool) -> Unreadable:
    """Why the record at `offset` cannot be read (a newer server's is `_newer_at`'s). Torn:
    shorter than its length says, and no whole record after it (a crash cut its write short).
    Tail: whole, the last, and failing its checksum (a power loss's unsynced write, or damage).
    Any bytes whole records follow are damage, as is a whole one that checks out but will not
    parse."""
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    whole = _HEAD.size + _POSITION.size <= length <= len(data) - start
    if not whole and not whole_after:  # its head may still name it (an older segment's: damage)
        return Unreadable(offset, TORN, *_head_of(data, start))
    checks_out = whole and zlib.crc32(memoryview(data)[start : start + length]) == crc
    what = TAIL if whole and not checks_out and not whole_after else DAMAGED
    return Unreadable(offset, what, *_head_of(data, start))


def _head_of(data: bytes, start: int) -> tuple[str, int, int]:
    """(session id, position, kind) of the body at `start`, when its head reads as a record's:
    a readable version, a known kind, a well-formed session id. ("", 0, 0) when not."""
    try:
        version, kind, sid_len = _HEAD.unpack_from(data, start)
        at = start + _HEAD.size
        session_id = data[at : at + sid_len].decode("ascii")
        (position,) = _POSITION.unpack_from(data, at + sid_len)
    except (struct.error, UnicodeDecodeError):
        return "", 0, 0
    if version not in READABLE or not TOKENS <= kind <= GEN_START:
        return "", 0, 0
    if not _SESSION_ID.fullmatch(session_id):
        return "", 0, 0
    return session_id, position, kind


def _frame_at(data: bytes, offset: int) -> tuple[JournalRecord | None, int]:
    """The record framed at `offset` and where the next begins, or (None, offset)."""
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    end_at = start + length
    if length < _HEAD.size + _POSITION.size or end_at > len(data):
        return None, offset
    if zlib.crc32(memoryview(data)[start:end_at]) != crc:
        return None, offset
    version, kind, sid_len = data[start], data[start + 1], data[start + 2]
    if version not in READABLE:  # a newer server's record: not ours to guess at
        return None, offset
    at = start + _HEAD.size
    try:
        session_id = data[at : at + sid_len].decode("ascii")
        at += sid_len
        (position,) = _POSITION.unpack_from(data, at)
        at += _POSITION.size
        request_id = ""
        if version >= 2:
            rid_len = data[at]
            request_id = data[at + 1 : at + 1 + rid_len].decode("utf-8")
            at += 1 + rid_len
        if kind in (TOKENS, FRAMES):
            top_k, per_position = 0, False
            if version >= 2:
                top_k, flag = _OPTIONS.unpack_from(data, at)
                per_position = bool(flag)
                at += _OPTIONS.size
            (count,) = _COUNT.unpack_from(data, at)
            at += _COUNT.size
            if at + 4 * count != end_at:
                return None, offset
            record = JournalRecord(
                kind, session_id, position, data[at:end_at], count,
                request_id=request_id, top_k=top_k, per_position=per_position,
            )  # fmt: skip
            return record, end_at
        if kind == GENERATED:
            _token, draws = _GENERATED.unpack_from(data, at)
            token = data[at : at + 4]
            return JournalRecord(
                kind, session_id, position, token, 1, draws, request_id=request_id
            ), end_at
        if kind in (CREATE, GEN_START):
            meta = json.loads(data[at:end_at])
            return JournalRecord(
                kind, session_id, position, meta=meta, request_id=request_id
            ), end_at
        if kind == END:
            why, _, owner = data[at:end_at].decode().partition("\n")
            meta = {"owner": owner} if owner else None
            return JournalRecord(kind, session_id, position, meta=meta, why=why), end_at
    except (ValueError, UnicodeDecodeError, struct.error, IndexError):
        pass
    return None, offset


def _resync(data: bytes, offset: int) -> int:
    """The next offset at or after `offset` where a whole record checks out, readable or a
    newer server's (`_newer_at`: skipping it would bring its session back short), or the end.
    Only offsets whose body would begin with a readable version and a known kind, or with a
    newer version and a session id, are tried (every whole record's does): `_frame_at` at
    every byte of a damaged 4 MB feed took 32 s."""
    size = len(data)
    while offset + _FRAME.size <= size:
        readable = _BODY_START.search(data, offset + _FRAME.size)
        end = readable.start() if readable is not None else size
        newer = _NEWER_START.search(data, offset + _FRAME.size, end)
        if newer is not None:
            offset = newer.start() - _FRAME.size
            if _newer_at(data, offset) is not None:
                return offset
        elif readable is None:
            break
        else:
            offset = end - _FRAME.size
            if _frame_at(data, offset)[0] is not None:
                return offset
        offset += 1
    return size

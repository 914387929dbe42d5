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
byte, a kind byte, the session id (its length, then ASCII) and the position, so a reader of
an older version can still tell whose a newer record is. Reading a segment back (damage,
torn writes, a newer server's records) is `journal_scan`.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np

VERSION = 2  # what this server writes
READABLE = (1, 2)
TOKENS, FRAMES, GENERATED, CREATE, END, GEN_START = 1, 2, 3, 4, 5, 6
MAX_REQUEST_ID = 255  # bytes of a request id a record can carry
FRAME = struct.Struct("<II")
HEAD = struct.Struct("<BBB")  # version, kind, session id length
POSITION = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_ONE = struct.Struct("<Ii")  # a count of one, and the int32 id
_OPTIONS = struct.Struct("<HB")  # top_k, per_position
_GENERATED = struct.Struct("<iB")
_INT32 = np.dtype("<i4")
_FLOAT32 = np.dtype("<f4")


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
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def _ids(kind: int, session_id: str, request_id: str) -> tuple[bytes, bytes]:
    """A body's head around its position: version, kind and session id before it, the request
    id after it."""
    sid = session_id.encode("ascii")
    rid = request_id.encode("utf-8")[:MAX_REQUEST_ID]
    return HEAD.pack(VERSION, kind, len(sid)) + sid, bytes([len(rid)]) + rid


def _head(kind: int, session_id: str, position: int, request_id: str = "") -> bytes:
    before, after = _ids(kind, session_id, request_id)
    return before + POSITION.pack(position) + after


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
            self._before + POSITION.pack(position) + self._after + _GENERATED.pack(token, draws)
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
    at = FRAME.size + 2  # past the frame, the version and the kind
    return record[at + 1 : at + 1 + record[at]].decode("ascii")


def kind_of(record: bytes) -> int:
    """An encoded record's kind (TOKENS … GEN_START)."""
    return record[FRAME.size + 1]


def decode_at(data: bytes, offset: int) -> tuple[JournalRecord | None, int]:
    """The readable record framed at `offset` and where the next begins, or (None, offset)
    (`journal_scan` reads whole segments with it)."""
    length, crc = FRAME.unpack_from(data, offset)
    start = offset + FRAME.size
    end_at = start + length
    if length < HEAD.size + POSITION.size or end_at > len(data):
        return None, offset
    if zlib.crc32(memoryview(data)[start:end_at]) != crc:
        return None, offset
    version, kind, sid_len = data[start], data[start + 1], data[start + 2]
    if version not in READABLE:  # a newer server's record: not ours to guess at
        return None, offset
    at = start + HEAD.size
    try:
        session_id = data[at : at + sid_len].decode("ascii")
        at += sid_len
        (position,) = POSITION.unpack_from(data, at)
        at += POSITION.size
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

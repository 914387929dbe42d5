"""Journal records: what each acknowledged step fed a session, as self-checking bytes.

A record is framed as

    length   4 bytes, unsigned little-endian: the body's length
    crc32    4 bytes, unsigned little-endian: zlib.crc32 of the body
    body     version (1 byte), kind (1 byte), session id (1-byte length, ASCII),
             the session's position before the record (8 bytes), then the kind's payload:
             TOKENS     count (4 bytes), int32 ids
             FRAMES     count (4 bytes), float32 values
             GENERATED  the sampled token (int32), the RNG draws it took (1 byte)
             CREATE     JSON (the rest of the body): model, version, seed, sampling, ...
             END        why (the rest of the body, UTF-8): "closed", "expired"

No pickle. A record that fails its checksum or is cut short is never applied; `decode_stream`
stops there (the rest of that segment was written after a failure or torn by a crash). The
version byte lets a newer server read an older server's records.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

VERSION = 1
TOKENS, FRAMES, GENERATED, CREATE, END = 1, 2, 3, 4, 5
_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<BBB")  # version, kind, session id length
_POSITION = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_GENERATED = struct.Struct("<iB")
_INT32 = np.dtype("<i4")
_FLOAT32 = np.dtype("<f4")


@dataclass(frozen=True)
class JournalRecord:
    kind: int
    session_id: str
    position: int  # the session's position before this record
    tokens: np.ndarray | None = None  # TOKENS: int32 ids; GENERATED: the one token
    frames: np.ndarray | None = None  # FRAMES: flat float32 values
    draws: int = 0  # GENERATED: uniform numbers its sampling took from the session's RNG
    meta: dict[str, Any] | None = None  # CREATE: the session's description
    why: str = ""  # END

    @property
    def consumed(self) -> int:
        """Inputs this record fed (frames count in values; the caller divides by the dim)."""
        if self.kind == TOKENS and self.tokens is not None:
            return int(self.tokens.shape[0])
        if self.kind == GENERATED:
            return 1
        return 0


def _frame(body: bytes) -> bytes:
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _head(kind: int, session_id: str, position: int) -> bytes:
    sid = session_id.encode("ascii")
    return _HEAD.pack(VERSION, kind, len(sid)) + sid + _POSITION.pack(position)


def tokens(session_id: str, position: int, ids: np.ndarray) -> bytes:
    data = np.ascontiguousarray(ids, dtype=_INT32)
    return _frame(_head(TOKENS, session_id, position) + _COUNT.pack(data.size) + data.tobytes())


def frames(session_id: str, position: int, values: np.ndarray) -> bytes:
    data = np.ascontiguousarray(values, dtype=_FLOAT32).reshape(-1)
    return _frame(_head(FRAMES, session_id, position) + _COUNT.pack(data.size) + data.tobytes())


def generated(session_id: str, position: int, token: int, draws: int) -> bytes:
    return _frame(_head(GENERATED, session_id, position) + _GENERATED.pack(token, draws))


def create(session_id: str, meta: dict[str, Any]) -> bytes:
    return _frame(_head(CREATE, session_id, 0) + json.dumps(meta).encode("utf-8"))


def end(session_id: str, position: int, why: str) -> bytes:
    return _frame(_head(END, session_id, position) + why.encode("utf-8"))


def decode_stream(data: bytes) -> Iterator[JournalRecord]:
    """The records of one segment, in order. A damaged record is skipped: reading resumes at
    the next offset where a whole record checks out (the damaged session's later records then
    show a gap, which recovery refuses with DATA_LOSS); a torn last record is simply the end."""
    offset, size = 0, len(data)
    while offset + _FRAME.size <= size:
        record, end = _frame_at(data, offset)
        if record is None:
            offset = _resync(data, offset + 1)
            continue
        yield record
        offset = end


def _frame_at(data: bytes, offset: int) -> tuple[JournalRecord | None, int]:
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    body = data[start : start + length]
    if len(body) != length or length < _HEAD.size or zlib.crc32(body) != crc:
        return None, offset
    try:
        return _decode_body(body), start + length
    except (ValueError, UnicodeDecodeError, struct.error):
        return None, offset


def _resync(data: bytes, offset: int) -> int:
    """The next offset at or after `offset` where a whole record checks out (or the end)."""
    size = len(data)
    while offset + _FRAME.size <= size:
        if _frame_at(data, offset)[0] is not None:
            return offset
        offset += 1
    return size


def _decode_body(body: bytes) -> JournalRecord | None:
    if len(body) < _HEAD.size:
        return None
    version, kind, sid_len = _HEAD.unpack_from(body, 0)
    if version != VERSION:  # a newer server's record: not ours to guess at
        return None
    at = _HEAD.size
    session_id = body[at : at + sid_len].decode("ascii")
    at += sid_len
    (position,) = _POSITION.unpack_from(body, at)
    at += _POSITION.size
    if kind in (TOKENS, FRAMES):
        (count,) = _COUNT.unpack_from(body, at)
        at += _COUNT.size
        dtype = _INT32 if kind == TOKENS else _FLOAT32
        values = np.frombuffer(body, dtype=dtype, count=count, offset=at).copy()
        if kind == TOKENS:
            return JournalRecord(kind, session_id, position, tokens=values)
        return JournalRecord(kind, session_id, position, frames=values)
    if kind == GENERATED:
        token, draws = _GENERATED.unpack_from(body, at)
        return JournalRecord(
            kind, session_id, position, tokens=np.array([token], dtype=_INT32), draws=draws
        )
    if kind == CREATE:
        return JournalRecord(kind, session_id, position, meta=json.loads(body[at:]))
    if kind == END:
        return JournalRecord(kind, session_id, position, why=body[at:].decode("utf-8"))
    return None

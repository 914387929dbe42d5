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
from typing import Any, NamedTuple

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


class JournalRecord(NamedTuple):
    """One decoded record. A tuple, not a dataclass: recovery decodes millions of them."""

    kind: int
    session_id: str
    position: int  # the session's position before this record
    data: bytes = b""  # TOKENS, GENERATED: int32 ids; FRAMES: float32 values
    n: int = 0  # values in `data`
    draws: int = 0  # GENERATED: uniform numbers its sampling took from the session's RNG
    meta: dict[str, Any] | None = None  # CREATE: the session's description
    why: str = ""  # END

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
    """The record framed at `offset` and where the next begins, or (None, offset)."""
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    end = start + length
    if length < _HEAD.size + _POSITION.size or end > len(data):
        return None, offset
    if zlib.crc32(memoryview(data)[start:end]) != crc:
        return None, offset
    version, kind, sid_len = data[start], data[start + 1], data[start + 2]
    if version != VERSION:  # a newer server's record: not ours to guess at
        return None, offset
    at = start + _HEAD.size
    try:
        session_id = data[at : at + sid_len].decode("ascii")
        at += sid_len
        (position,) = _POSITION.unpack_from(data, at)
        at += _POSITION.size
        if kind in (TOKENS, FRAMES):
            (count,) = _COUNT.unpack_from(data, at)
            at += _COUNT.size
            if at + 4 * count != end:
                return None, offset
            return JournalRecord(kind, session_id, position, data[at:end], count), end
        if kind == GENERATED:
            _token, draws = _GENERATED.unpack_from(data, at)
            return JournalRecord(kind, session_id, position, data[at : at + 4], 1, draws), end
        if kind == CREATE:
            meta = json.loads(data[at:end])
            return JournalRecord(kind, session_id, position, meta=meta), end
        if kind == END:
            return JournalRecord(kind, session_id, position, why=data[at:end].decode()), end
    except (ValueError, UnicodeDecodeError, struct.error):
        pass
    return None, offset


def _resync(data: bytes, offset: int) -> int:
    """The next offset at or after `offset` where a whole record checks out (or the end)."""
    size = len(data)
    while offset + _FRAME.size <= size:
        if _frame_at(data, offset)[0] is not None:
            return offset
        offset += 1
    return size

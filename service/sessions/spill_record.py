"""The spill record: one session's state and metadata as a self-checking byte string.

Layout (version 3; versions 1 and 2 are still read: version 2 also holds `last`, the head's
output for h, after the arrays, and its header's `rng_state` is always numpy's state; version 1
has no owner block either):

    b"SQSPILL3"      8 bytes: magic and format version
    owner            2 bytes (length, unsigned little-endian), the owner's name (UTF-8), and
                     a CRC-32 of the name (4 bytes): readable on its own when the rest of the
                     record is damaged, so only the owner is told its session is lost
    header length    4 bytes, unsigned little-endian
    header           JSON (UTF-8), a `SpillHeader`
    arrays           float32 little-endian: h [L, H], then c [L, H] (LSTM only)
    sha256           32 bytes, over everything before it

A server that reads only versions 1 and 2 refuses a version-3 record as not a spill record
(DATA_LOSS) instead of misreading it. Later versions keep what versions 2 and 3 share: the magic
(`SQSPILL` and a version byte), the owner block right after it, and the sha256 at the end. So a
record whose version byte is above this server's and whose checksum is good is a newer server's
(`newer`), not damage, and its owner block still says whose it is (`newer_owner`): the shared
tier refuses to take such a session over, and the local spill directory refuses the session
and keeps the record (WrittenByNewer), rather than counting it lost.

No pickle anywhere: the header is JSON (numpy's PCG64 state is a dict of plain ints), the arrays
are raw floats whose shapes the header states. The checksum covers the header too, so a flipped
position or fingerprint is caught, not just damaged state.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import SpillCorrupted
from service.runtime.sampler import SamplingParams
from service.runtime.state_pool import SlotSnapshot
from service.sessions.session import SESSION_ID_PATTERN

MAGIC_V1 = b"SQSPILL1"
MAGIC_V2 = b"SQSPILL2"
MAGIC = b"SQSPILL3"  # what this server writes
_LENGTH = struct.Struct("<I")
_OWNER = struct.Struct("<H")
PREFIX_BYTES = len(MAGIC) + _LENGTH.size  # a version-1 record's bytes before its header
DIGEST_BYTES = 32
_SOURCE = "its spill record"
MAX_HEADER_BYTES = 1 << 20  # far above any real header; bounds what a damaged length can ask for
_FLOAT = np.dtype("<f4")


class SpillHeader(BaseModel):
    """Everything about a session except its state arrays."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    model: str
    version: int = Field(ge=1)
    fingerprint: str
    position: int = Field(ge=0)
    seed: int
    parent_session_id: str
    created_at: float  # wall clock
    ttl_seconds: float = Field(gt=0)
    last_used_wall: float  # wall clock of its last use: the TTL runs on across a restart
    # numpy's PCG64 bit-generator state, or {"seed", "draws"} for a stream not drawn from
    # since it was seeded (`SessionRng.record_state`; read by `SessionRng.from_state`)
    rng_state: dict[str, Any]
    default_sampling: SamplingParams  # as its dataclass fields, in JSON
    # The last request applied under a request id, and its reply (exactly-once retries);
    # absent in records of servers before it.
    last_request: dict[str, Any] | None = None
    made_by: str = ""  # the create or fork request that made the session
    owner: str = ""  # the principal that owns it ("": made with auth off)
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    has_cell_state: bool
    output_dim: int = Field(ge=1)

    def array_bytes(self, with_last: bool = False) -> int:
        """The state's bytes in a record (`with_last`: and the head output versions 1 and 2
        kept after them)."""
        per = self.num_layers * self.hidden_size
        return 4 * (per * (2 if self.has_cell_state else 1) + (self.output_dim if with_last else 0))


@dataclass(frozen=True)
class SpillRecord:
    header: SpillHeader
    state: SlotSnapshot


def encode(record: SpillRecord) -> bytes:
    header, state = record.header, record.state
    layers, hidden = header.num_layers, header.hidden_size
    assert state.h.shape == (layers, hidden), f"h is {state.h.shape}, header says {layers}x{hidden}"
    assert (state.c is not None) == header.has_cell_state, "cell state present iff an LSTM"
    head = header.model_dump_json().encode("utf-8")
    owner = header.owner.encode("utf-8")
    arrays = [state.h] + ([state.c] if state.c is not None else [])
    body = b"".join(
        [MAGIC, _OWNER.pack(len(owner)), owner, _LENGTH.pack(zlib.crc32(owner))]
        + [_LENGTH.pack(len(head)), head]
        + [np.ascontiguousarray(a, dtype=_FLOAT).tobytes() for a in arrays]
    )
    return body + hashlib.sha256(body).digest()


def read_prefix(read) -> tuple[int, str | None]:  # type: ignore[no-untyped-def]
    """From `read(n)` (a file's, or a buffer's): the header's length, and the owner a version-2
    or -3 record names (None: version 1, or an owner block that fails its own check). Raises
    SpillCorrupted for a record whose start is damaged (carrying the owner when readable)."""
    magic = read(len(MAGIC))
    owner: str | None = None
    if magic in (MAGIC, MAGIC_V2):
        owner = _owner_block(read)
    elif magic != MAGIC_V1:
        raise SpillCorrupted(f"{_SOURCE}: not a spill record (bad magic)")
    (length,) = _LENGTH.unpack(_exact(read, _LENGTH.size, owner))
    if not 0 < length <= MAX_HEADER_BYTES:
        raise _corrupted(f"{_SOURCE}: header length {length} is out of range", owner)
    return length, owner


def _owner_block(read) -> str | None:  # type: ignore[no-untyped-def]
    """The owner block after the magic: the name, or None when it fails its own CRC."""
    (size,) = _OWNER.unpack(_exact(read, _OWNER.size))
    name = _exact(read, size)
    (crc,) = _LENGTH.unpack(_exact(read, _LENGTH.size))
    return name.decode("utf-8", errors="replace") if zlib.crc32(name) == crc else None


def newer_magic(magic: bytes) -> bool:
    """Whether a record's first bytes are the magic of a later format than this server's."""
    return len(magic) == len(MAGIC) and magic[:-1] == MAGIC[:-1] and magic[-1] > MAGIC[-1]


def newer(data: bytes) -> bool:
    """Whether `data` is a whole record of a later format than this server reads: its magic's
    version byte above this server's, and its sha256 good (damage fails that)."""
    return (
        len(data) >= len(MAGIC) + DIGEST_BYTES
        and newer_magic(data[: len(MAGIC)])
        and hashlib.sha256(data[:-DIGEST_BYTES]).digest() == data[-DIGEST_BYTES:]
    )


def newer_owner(data: bytes) -> str:
    """The owner a `newer` record's owner block names ("" when it does not read as one)."""
    try:
        return _owner_block(io.BytesIO(data[len(MAGIC) : -DIGEST_BYTES]).read) or ""
    except SpillCorrupted:
        return ""


def _exact(read, n: int, owner: str | None = None) -> bytes:  # type: ignore[no-untyped-def]
    data = read(n)
    if len(data) != n:
        raise _corrupted(f"{_SOURCE}: truncated", owner)
    return bytes(data)


def _corrupted(message: str, owner: str | None) -> SpillCorrupted:
    error = SpillCorrupted(message)
    error.owner = owner or ""
    return error


def parse_header(raw: bytes, source: str) -> SpillHeader:
    try:
        return SpillHeader.model_validate_json(raw)
    except ValidationError as exc:  # bad UTF-8 and bad JSON included
        # One line naming the first bad field, not pydantic's multi-line dump (which quoted
        # the header's bytes into the client's DATA_LOSS message): the cause keeps it all.
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        where = where or "its JSON"
        raise SpillCorrupted(f"{source}: unreadable header ({where})") from exc


def decode(data: bytes, source: str) -> SpillRecord:
    """Check the checksum, then parse. Raises SpillCorrupted on any damage."""
    if len(data) < PREFIX_BYTES + DIGEST_BYTES:
        raise SpillCorrupted(f"{source}: truncated ({len(data)} bytes)")
    body, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    stream = io.BytesIO(body)
    length, owner = read_prefix(stream.read)
    if hashlib.sha256(body).digest() != digest:
        raise _corrupted(
            f"{source}: checksum mismatch; the record is damaged and was not used", owner
        )
    at = stream.tell()
    start = at + length
    header = parse_header(body[at:start], source)
    expected = header.array_bytes(with_last=not body.startswith(MAGIC))  # `last`: ignored
    if len(body) - start != expected:
        raise SpillCorrupted(
            f"{source}: {len(body) - start} bytes of state, the header implies {expected}"
        )
    floats = np.frombuffer(body, dtype=_FLOAT, offset=start)
    per = header.num_layers * header.hidden_size
    shape = (header.num_layers, header.hidden_size)
    h = floats[:per].reshape(shape).astype(np.float32)
    rest = floats[per:]
    c = None
    if header.has_cell_state:
        c = rest[:per].reshape(shape).astype(np.float32)
    return SpillRecord(header, SlotSnapshot(h=h, c=c))

"""What a newer seqserve leaves in a state directory, made by hand: journal records and spill
records of a format version above this server's, whole (their checksums made good), as after a
downgrade; and the same put back, standing in for a server of that version reading them."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

from service.sessions import journal_record as jr
from service.sessions import spill_record

NEWER_JOURNAL = jr.VERSION + 1
NEWER_SPILL = spill_record.MAGIC[:-1] + bytes([spill_record.MAGIC[-1] + 1])


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(offset, frame length) of every whole frame of a segment, in order."""
    found, at = [], 0
    while at + 8 <= len(data):
        length = int.from_bytes(data[at : at + 4], "little")
        if at + 8 + length > len(data):
            break
        found.append((at, 8 + length))
        at += 8 + length
    return found


def newer_frame(frame: bytes) -> bytes:
    """One journal frame (length, CRC, body) with its body's version byte a newer server's,
    its CRC made good."""
    body = bytearray(frame[8:])
    body[0] = NEWER_JOURNAL
    return frame[:4] + zlib.crc32(bytes(body)).to_bytes(4, "little") + bytes(body)


def newer_spill(record: bytes) -> bytes:
    """A spill record with a newer server's magic, its sha256 made good."""
    assert record.startswith(spill_record.MAGIC)
    body = NEWER_SPILL + record[len(NEWER_SPILL) : -spill_record.DIGEST_BYTES]
    return body + hashlib.sha256(body).digest()


def set_journal_version(
    journal: Path, session_id: str, position: int, old: int, new: int, kind: int = 0
) -> int:
    """Give every record of `session_id` at `position` (of `kind`, when one is named) whose
    version byte is `old` the version byte `new`, its CRC made good, in every segment of the
    `journal` directory; how many were changed."""
    head = bytes([len(session_id)]) + session_id.encode() + position.to_bytes(8, "little")
    changed = 0
    for segment in sorted(journal.glob("*.log")):
        data = bytearray(segment.read_bytes())
        for at, size in _frames(bytes(data)):
            body = at + 8
            if data[body] != old or data[body + 2 : body + 2 + len(head)] != head:
                continue
            if kind and data[body + 1] != kind:
                continue
            data[body] = new
            data[at + 4 : at + 8] = zlib.crc32(data[body : at + size]).to_bytes(4, "little")
            changed += 1
        segment.write_bytes(bytes(data))
    return changed


def set_spill_magic(record: Path, magic: bytes) -> None:
    """Give the spill record at `record` the magic `magic` (its format version), its sha256 made
    good."""
    data = record.read_bytes()
    body = magic + data[len(magic) : -spill_record.DIGEST_BYTES]
    record.write_bytes(body + hashlib.sha256(body).digest())

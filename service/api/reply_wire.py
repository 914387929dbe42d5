"""A Stream message's feed replies, written as protobuf wire bytes and parsed once.

Building the replies of a 64-feed message through protobuf's Python API costs an `add()` per
reply and per top-k entry and a call per field: ~3.0 µs a reply with its serialization
(in-process, 64 replies of a top-5 prediction). Most of a top-k entry's bytes are fixed by its
token id (the id and its text), so they come from a table made once per tokenizer, with only the
probability packed per entry; the response is then parsed from all replies' bytes in one call
(protobuf's C parser), and gRPC serializes it as before: ~2.1 µs a reply, the same message
(`tests/api/test_reply_wire.py` compares them field for field).

Field numbers are `seqserve.v1`'s (StreamResponse.replies = 1; StreamReply: session_id = 1,
request_id = 2, position = 3, prediction = 4; Prediction: tokens = 1, regression = 2,
position = 3; TokenPrediction.top = 1; TopToken: id = 1, prob = 2, text = 3; Regression.values
= 1, packed). A test fails when the protos renumber any of them.
"""

from __future__ import annotations

import struct

from service.models.tokenizer import ByteTokenizer
from service.runtime.step_batch import Prediction

_FLOAT = struct.Struct("<f").pack

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited, 5 32-bit).
_REPLIES = b"\x0a"  # StreamResponse.replies
_SESSION_ID, _REQUEST_ID, _POSITION, _PREDICTION = b"\x0a", b"\x12", b"\x18", b"\x22"  # StreamReply
_TOKENS, _REGRESSION, _PRED_POSITION = b"\x0a", b"\x12", b"\x18"  # Prediction
_TOP = b"\x0a"  # TokenPrediction.top
_TOP_ID, _TOP_PROB, _TOP_TEXT = b"\x08", b"\x15", b"\x1a"  # TopToken
_VALUES = b"\x0a"  # Regression.values (packed)


def varint(n: int) -> bytes:
    """`n` (>= 0) as a protobuf varint."""
    if n < 0:
        raise ValueError(f"varint of a negative number: {n}")
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [varint(n) for n in range(1 << 14)]  # lengths and positions up to 16,383: one lookup


def _uint(n: int) -> bytes:
    return _SMALL[n] if n < 16384 else varint(n)


def _field(tag: bytes, body: bytes) -> bytes:
    return tag + _uint(len(body)) + body


class _TopTable:
    """A top-k entry's bytes around its probability, per token id: (the entry's tag, length,
    id and the probability's tag) and (its text)."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._decode = tokenizer.decode_one
        self.before: list[bytes] = []
        self.after: list[bytes] = []

    def grow(self, token_id: int) -> None:
        """Entries for every id up to `token_id` (a vocabulary is small and dense)."""
        for t in range(len(self.before), token_id + 1):
            text = self._decode(t).encode()
            id_field = _TOP_ID + varint(t) if t else b""  # an id of 0 is the default: not written
            text_field = _field(_TOP_TEXT, text) if text else b""
            size = len(id_field) + 5 + len(text_field)
            self.before.append(_TOP + _uint(size) + id_field + _TOP_PROB)
            self.after.append(text_field)


_TABLES: dict[str, _TopTable] = {}


def _table(tokenizer: ByteTokenizer) -> _TopTable:
    table = _TABLES.get(tokenizer.name)
    if table is None:
        table = _TABLES[tokenizer.name] = _TopTable(tokenizer)
    return table


def prediction(pred: Prediction, position: int, tokenizer: ByteTokenizer | None) -> bytes:
    """A `Prediction` message's bytes, as `convert.fill_prediction` would fill it."""
    tail = _PRED_POSITION + _uint(position) if position else b""
    if pred.values:
        return (
            _field(_REGRESSION, _field(_VALUES, struct.pack(f"<{len(pred.values)}f", *pred.values)))
            + tail
        )
    assert tokenizer is not None
    table = _table(tokenizer)
    ids = pred.top_ids
    if ids and max(ids) >= len(table.before):
        table.grow(max(ids))
    before, after = table.before, table.after
    top = b"".join(
        [before[t] + _FLOAT(p) + after[t] for t, p in zip(ids, pred.top_probs, strict=True)]
    )
    return _TOKENS + _uint(len(top)) + top + tail


def feed_reply(
    session_id: str,
    request_id: str,
    position: int,
    pred: Prediction | None,
    tokenizer: ByteTokenizer | None,
) -> bytes:
    """One `StreamResponse.replies` entry (its tag and length included): a feed's reply, with
    its prediction unless `pred` is None (the item asked to skip it)."""
    body = _field(_SESSION_ID, session_id.encode()) if session_id else b""
    if request_id:
        body += _field(_REQUEST_ID, request_id.encode())
    if position:
        body += _POSITION + _uint(position)
    if pred is not None:
        body += _field(_PREDICTION, prediction(pred, position, tokenizer))
    return _field(_REPLIES, body)


def message_entry(reply_bytes: bytes) -> bytes:
    """A reply already serialized (an error, per-position predictions) as a replies entry."""
    return _field(_REPLIES, reply_bytes)

"""A Stream message's feed replies, written as protobuf wire bytes and parsed once.

Building the replies of a 64-feed message through protobuf's Python API costs an `add()` per
reply and per top-k entry and a call per field: ~3.0 µs a reply with its serialization
(in-process, 64 replies of a top-5 prediction). Most of a top-k entry's bytes are fixed by its
token id (the id and its text), so they come from a table per tokenizer (an id's entry made
when the id is first seen), with only the probability packed per entry; the response is then
parsed from all replies' bytes in one call (protobuf's C parser), and gRPC serializes it as
before: ~2.2 µs a reply, the same message (`tests/api/test_reply_wire.py` compares them field
for field, and the bytes).

Field numbers are `seqserve.v1`'s (StreamResponse.replies = 1; StreamReply: session_id = 1,
request_id = 2, position = 3, prediction = 4; Prediction: tokens = 1, regression = 2,
position = 3; TokenPrediction.top = 1; TopToken: id = 1, prob = 2, text = 3; Regression.values
= 1, packed). A test fails when the protos renumber any of them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

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


_SMALL = [varint(n) for n in range(1 << 14)]  # lengths and most positions: one lookup (~0.7 MB)


def _uint(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 16384 else varint(n)  # varint raises on a negative n


def _field(tag: bytes, body: bytes) -> bytes:
    return tag + _uint(len(body)) + body


class _TopTable:
    """A top-k entry's bytes around its probability, per token id: (the entry's tag, length,
    id and the probability's tag) and (its text). Made for an id when first needed."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._decode = tokenizer.decode_one
        self.before: dict[int, bytes] = {}
        self.after: dict[int, bytes] = {}

    def add(self, ids: Sequence[int]) -> None:
        for t in ids:
            if t < 0:
                raise ValueError(f"negative token id in a prediction: {t}")
            text = self._decode(t).encode()
            id_field = _TOP_ID + varint(t) if t else b""  # an id of 0 is the default: not written
            text_field = _field(_TOP_TEXT, text) if text else b""
            size = len(id_field) + 5 + len(text_field)
            self.before[t] = _TOP + _uint(size) + id_field + _TOP_PROB
            self.after[t] = text_field


_TABLES: dict[str, _TopTable] = {}


def _table(tokenizer: ByteTokenizer) -> _TopTable:
    table = _TABLES.get(tokenizer.name)
    if table is None:
        table = _TABLES[tokenizer.name] = _TopTable(tokenizer)
    return table


def prediction(
    pred: Prediction, position: int, tokenizer: ByteTokenizer | None, encoded: bytes = b""
) -> bytes:
    """A `Prediction` message's bytes, as `convert.fill_prediction` would fill it (`encoded`:
    the position's varint, when the caller has it)."""
    tail = _PRED_POSITION + (encoded or _uint(position)) if position else b""
    if pred.values:
        return (
            _field(_REGRESSION, _field(_VALUES, struct.pack(f"<{len(pred.values)}f", *pred.values)))
            + tail
        )
    assert tokenizer is not None
    table = _table(tokenizer)
    ids, probs = pred.top_ids, pred.top_probs
    before, after = table.before, table.after
    try:
        top = b"".join([before[t] + _FLOAT(p) + after[t] for t, p in zip(ids, probs, strict=True)])
    except KeyError:  # an id not seen before: make its entry, and again
        table.add(ids)
        return prediction(pred, position, tokenizer, encoded)
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
    encoded = b""
    if position:
        encoded = _uint(position)
        body += _POSITION + encoded
    if pred is not None:
        body += _field(_PREDICTION, prediction(pred, position, tokenizer, encoded))
    return _field(_REPLIES, body)


def message_entry(reply_bytes: bytes) -> bytes:
    """A reply already serialized (an error, per-position predictions) as a replies entry."""
    return _field(_REPLIES, reply_bytes)

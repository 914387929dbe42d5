"""An upper bound on the bytes of a feed's reply, checked before its step runs.

A reply too large to send must be refused before the step changes the session, not after:
otherwise the client is told the request failed while the session moved on. The bound counts
every field at its largest protobuf encoding (a TopToken's id, probability and text; a
regression value; the position), plus `OVERHEAD_BYTES` for the reply's own ids and framing.
"""

from __future__ import annotations

import functools

from service.models import ByteTokenizer, ModelConfig

OVERHEAD_BYTES = 1024  # session and request ids, the position, message framing
_FIELD = 1 + 3  # a tag and a length prefix (lengths below 2 MiB)
_POSITION = 1 + 10  # a tag and the longest varint


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


@functools.lru_cache(maxsize=256)  # checked for every feed: ~5% of the server's CPU uncached
def prediction_bytes(config: ModelConfig, tokenizer: ByteTokenizer | None, top_k: int) -> int:
    """The most one Prediction message of this model can take, with `top_k` entries."""
    if tokenizer is None:  # regression: packed float32 values
        return _FIELD + _POSITION + _FIELD + _FIELD + 4 * config.output_dim
    vocab = config.output_dim
    longest_text = max(len(tokenizer.decode_one(i).encode()) for i in range(min(vocab, 256)))
    entry = _FIELD + (1 + _varint_len(vocab - 1)) + (1 + 4) + (2 + longest_text)
    k = max(1, min(top_k, vocab))
    return _FIELD + _POSITION + _FIELD + k * entry


def reply_bytes(
    config: ModelConfig,
    tokenizer: ByteTokenizer | None,
    top_k: int,
    positions: int,
    per_position: bool,
) -> int:
    """The most a feed's reply can take: the prediction after its last input, and one per
    input when `per_position` is asked for."""
    predictions = 1 + (positions if per_position else 0)
    return OVERHEAD_BYTES + predictions * prediction_bytes(config, tokenizer, top_k)

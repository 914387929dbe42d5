"""The default tokenizer: UTF-8 bytes, vocabulary 256. No external files."""

from __future__ import annotations


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    # Each byte on its own as text (a lone non-ASCII byte is U+FFFD), decoded once.
    _PIECES = tuple(bytes([b]).decode("utf-8", errors="replace") for b in range(256))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Decode ids; bytes that do not form valid UTF-8 come out as U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")

    def decode_one(self, token_id: int) -> str:
        """The text of one token on its own (a lone continuation byte gives U+FFFD)."""
        return self._PIECES[token_id]


def get_tokenizer(name: str) -> ByteTokenizer:
    if name != ByteTokenizer.name:
        raise ValueError(f"unknown tokenizer {name!r}; available: {ByteTokenizer.name!r}")
    return ByteTokenizer()

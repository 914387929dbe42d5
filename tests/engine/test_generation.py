"""TokenText: a generation's tokens as text, and when it ends."""

from __future__ import annotations

import codecs
import random

import pytest

from service.engine.generation import (
    FINISH_MAX_TOKENS,
    FINISH_STOP_STRING,
    FINISH_STOP_TOKEN,
    GenerationLog,
    TokenText,
)
from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams

# Bytes that exercise every decoder state: ASCII, two/three/four-byte lead bytes, continuation
# bytes, and bytes that are never valid UTF-8.
_MIXED = [
    *range(0x20, 0x7F),
    0xC3,
    0xA9,
    0xE2,
    0x82,
    0xAC,
    0xF0,
    0x9F,
    0x98,
    0x80,
    0x80,
    0xFF,
    0xC0,
]


def _texts(tokens: list[int], sampling: SamplingParams) -> list[str]:
    text = TokenText(sampling, ByteTokenizer(), GenerationLog(sampling))
    return [text.add(t, i + 1).text for i, t in enumerate(tokens)]


@pytest.mark.parametrize("seed", range(20))
def test_each_token_s_text_is_what_an_incremental_utf8_decoder_gives(seed: int) -> None:
    """ASCII between characters takes a shortcut; every other byte goes through the decoder.
    The texts must be the decoder's, token by token, whatever the mix."""
    rng = random.Random(seed)
    tokens = [rng.choice(_MIXED) for _ in range(300)]
    sampling = SamplingParams(max_tokens=len(tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    expected = [decoder.decode(bytes([t])) for t in tokens]
    expected[-1] += decoder.decode(b"", final=True)  # the last token flushes what is held
    assert _texts(tokens, sampling) == expected
    assert "".join(expected) == bytes(tokens).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_comes_out_with_its_last_byte() -> None:
    euro = list("€".encode())  # three bytes
    texts = _texts([ord("a"), *euro, ord("b")], SamplingParams(max_tokens=5))
    assert texts == ["a", "", "", "€", "b"]
    # ASCII right after a lead byte ends the broken character: U+FFFD, then the letter.
    assert _texts([0xC3, ord("x")], SamplingParams(max_tokens=2)) == ["", "\ufffdx"]
    # A generation that ends mid-character flushes the bytes it holds.
    assert _texts([ord("a"), 0xE2], SamplingParams(max_tokens=2)) == ["a", "\ufffd"]


def test_the_finish_reasons() -> None:
    sampling = SamplingParams(max_tokens=10, stop_token_ids=(10,), stop_strings=("END",))
    text = TokenText(sampling, ByteTokenizer(), GenerationLog(sampling))
    reasons = [text.add(t, i).finish_reason for i, t in enumerate(b"xEN")]
    assert reasons == [None, None, None]
    assert text.add(ord("D"), 4).finish_reason == FINISH_STOP_STRING
    assert _finish([ord("a"), 10], sampling) == FINISH_STOP_TOKEN
    assert _finish([ord("a")] * 3, SamplingParams(max_tokens=3)) == FINISH_MAX_TOKENS


def _finish(tokens: list[int], sampling: SamplingParams) -> str | None:
    text = TokenText(sampling, ByteTokenizer(), GenerationLog(sampling))
    return [text.add(t, i).finish_reason for i, t in enumerate(tokens)][-1]

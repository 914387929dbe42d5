"""TokenText: a generation's tokens as text, and when it ends; a consumer that leaves."""

from __future__ import annotations

import asyncio
import codecs
import random

import pytest

from service.engine import batch_window, session_generator
from service.engine.generation import (
    FINISH_MAX_TOKENS,
    FINISH_STOP_STRING,
    FINISH_STOP_TOKEN,
    Generation,
    GenerationLog,
    TokenText,
)
from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams

from .conftest import EngineFactory

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


@pytest.mark.parametrize("seed", range(20))
def test_a_generation_continued_from_its_log_gives_the_uninterrupted_text(seed: int) -> None:
    """A retry continues a generation from its log (`Generation(..., log)`) with a new
    TokenText: cut anywhere, mid-character included, its texts and its end are the
    uninterrupted ones. A new decoder dropped the bytes the log held back: a continuation byte
    came out U+FFFD (`Ϻ` lost), an ASCII byte without the U+FFFD before it, and a stop string
    across the cut was missed (the generation ran on to max_tokens)."""
    rng = random.Random(seed)
    tokens = [rng.choice(_MIXED) for _ in range(120)]
    sampling = SamplingParams(max_tokens=len(tokens), stop_strings=("\u03fa", "\ufffd\ufffd"))
    whole = TokenText(sampling, ByteTokenizer(), GenerationLog(sampling))
    want = []
    for i, t in enumerate(tokens):
        want.append(whole.add(t, i + 1))
        if want[-1].finish_reason is not None:
            break
    for cut in range(1, len(want)):
        log = GenerationLog(sampling)
        first = TokenText(sampling, ByteTokenizer(), log)
        for i, t in enumerate(tokens[:cut]):
            first.add(t, i + 1)
        continued = TokenText(sampling, ByteTokenizer(), log)  # what a retry builds
        for i in range(cut, len(want)):
            continued.add(tokens[i], i + 1)
        assert log.tokens == want, cut


def test_a_stop_string_across_a_retry_s_cut_is_found() -> None:
    """`Ϻ` is CF BA: the log ends on CF (held back), the retry's first token is BA."""
    sampling = SamplingParams(max_tokens=50, stop_strings=("Ϻ",))
    log = GenerationLog(sampling)
    first = TokenText(sampling, ByteTokenizer(), log)
    assert [first.add(t, i).text for i, t in enumerate([ord("a"), 0xCF])] == ["a", ""]
    continued = TokenText(sampling, ByteTokenizer(), log)
    token = continued.add(0xBA, 3)
    assert (token.text, token.finish_reason) == ("Ϻ", FINISH_STOP_STRING)
    lone = GenerationLog(sampling)
    TokenText(sampling, ByteTokenizer(), lone).add(0xC3, 1)
    assert TokenText(sampling, ByteTokenizer(), lone).add(ord("4"), 2).text == "\ufffd4"


def _finish(tokens: list[int], sampling: SamplingParams) -> str | None:
    text = TokenText(sampling, ByteTokenizer(), GenerationLog(sampling))
    return [text.add(t, i).finish_reason for i, t in enumerate(tokens)][-1]


async def test_a_consumer_that_leaves_holding_a_token_does_not_hold_the_other_generations(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step waits for the generations' consumers to take its tokens (`BatchWindow`). A
    client that goes away while the step waits for it (its generation closed with a token
    unread) ends that wait at once: the other generations go on without it (the bound on the
    wait is raised here, so that only the consumer's leaving can end it in time)."""
    monkeypatch.setattr(batch_window, "SEND_WAIT_SECONDS", 60.0)
    made: list[Generation] = []

    class Recorded(Generation):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(session_generator, "Generation", Recorded)
    engine = await make_engine()
    leaving, _ = await engine.create_session("tok", seed=1)
    staying, _ = await engine.create_session("tok", seed=2)
    sampling = SamplingParams(temperature=1.0, max_tokens=30)
    left = engine.generate(leaving.session_id, sampling=sampling)
    await anext(left)  # its first token; then its client stops reading

    async def take_all() -> int:
        return len([t async for t in engine.generate(staying.session_id, sampling=sampling)])

    async def step_waits_for_it() -> None:
        while not (made and made[0].tokens.on_drained is not None):
            await asyncio.sleep(0.001)

    other = asyncio.ensure_future(take_all())
    await asyncio.wait_for(step_waits_for_it(), 20)
    await left.aclose()  # the client goes away with a token unread
    assert await asyncio.wait_for(other, 20) == 30

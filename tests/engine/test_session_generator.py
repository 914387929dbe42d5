"""SessionGenerator: a generation's retry, when its call went away mid-prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.engine.generation import GeneratedToken
from service.runtime.sampler import SamplingParams

from .conftest import EngineFactory, settled, slow_steps, toks, wait_idle

SAMPLING = SamplingParams(max_tokens=3)


async def test_a_generate_cancelled_while_its_prompt_steps_is_retried_as_itself(
    make_engine: EngineFactory,
) -> None:
    """The caller goes away while the prompt's step runs: the prompt is applied all the same,
    so the retry (same request id, the position before) continues that generation instead of
    being refused with a position mismatch; its tokens are those of an uninterrupted one."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    session, _ = await engine.create_session("tok", seed=5)
    reference, _ = await engine.create_session("tok", seed=5)

    async def generate(session_id: str) -> list[GeneratedToken]:
        tokens = engine.generate(
            session_id, toks(1, 2, 3), SAMPLING, expected_position=0, request_id="g1"
        )
        return [t async for t in tokens]

    with slow_steps(engine) as in_step:
        call = asyncio.create_task(generate(session.session_id))
        await asyncio.wait_for(in_step.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await settled(session, 3)
    retried = await generate(session.session_id)
    want = await generate(reference.session_id)
    assert [t.position for t in retried] == [4, 5, 6]
    assert [t.token_id for t in retried] == [t.token_id for t in want]


async def test_a_generate_whose_prompt_step_fails_leaves_the_last_request_as_it_was(
    make_engine: EngineFactory,
) -> None:
    """A refused request changes nothing: a retry of the step applied before it still gets
    its original reply (the generation, remembered before its prompt ran, replaced it)."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    session, _ = await engine.create_session("tok")
    first = await engine.feed(session.session_id, toks(1, 2), expected_position=0, request_id="r1")
    with slow_steps(engine, seconds=0.0, fail=True), pytest.raises(RuntimeError):
        _ = [
            t
            async for t in engine.generate(
                session.session_id, toks(3), SAMPLING, expected_position=2, request_id="g1"
            )
        ]
    again = await engine.feed(session.session_id, toks(1, 2), expected_position=0, request_id="r1")
    assert again.position == first.position == 2 == session.position


async def test_a_generation_cancelled_mid_character_and_retried_gives_the_uninterrupted_text(
    make_engine: EngineFactory,
) -> None:
    """At temperature 100 the test model's tokens are near-uniform bytes, half of them not
    ASCII: generations cancelled after each of the first 16 tokens, then retried (same request
    id), give the uninterrupted generation's tokens and text. The retry's new TokenText dropped
    a character's first bytes held back at the cut: wrong text where the cut split one."""
    engine = await make_engine()
    hot = SamplingParams(temperature=100.0, max_tokens=40)

    def generate(session_id: str) -> AsyncIterator[GeneratedToken]:
        return engine.generate(session_id, sampling=hot, expected_position=0, request_id="g")

    reference, _ = await engine.create_session("tok", seed=11)
    want = [(t.token_id, t.text) async for t in generate(reference.session_id)]
    split = 0  # cuts whose last token held a character back
    for cut in range(1, 17):
        session, _ = await engine.create_session("tok", seed=11)
        first = generate(session.session_id)
        got = [await anext(first) for _ in range(cut)]
        split += got[-1].text == ""
        await first.aclose()  # the caller goes away
        await wait_idle(session)
        got = [t async for t in generate(session.session_id)]
        assert [(t.token_id, t.text) for t in got] == want, cut
    assert split > 0, "no cut fell inside a character: the case is not tested"

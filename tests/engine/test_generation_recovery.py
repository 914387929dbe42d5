"""A generation's exactly-once rule across a crash: its GEN_START record is journaled before its
prompt runs, so a generation whose prompt was never applied (its step failed, or the call went
away before the row entered a step) leaves only that record. In memory such a generation leaves
the session's last request as it was; after a crash, recovery must do the same: the retry of the
Step before it still gets its original reply, and the generation, retried, applies anew."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.engine.generation import GeneratedToken
from service.engine.session_engine import PredictionOptions, SessionEngine
from service.errors import Internal
from service.runtime.sampler import SamplingParams
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js

from .conftest import EngineFactory, close, crash, settled, slow_steps, toks

SAMPLING = SamplingParams(temperature=1.0, max_tokens=3)
OPTIONS = PredictionOptions(top_k=3)


async def _generate(
    engine: SessionEngine, session_id: str, prompt: bool = True
) -> list[GeneratedToken]:
    """The generation "g1" from position 2, with the prompt [7, 8] or none."""
    tokens = engine.generate(
        session_id, toks(7, 8) if prompt else None, SAMPLING, expected_position=2, request_id="g1"
    )
    return [t async for t in tokens]


async def _not_applied(engine: SessionEngine, session_id: str, how: str) -> None:
    """Start "g1" and end it before its prompt is applied, `how`:
    failed: the prompt's step fails; first-token-failed: without a prompt, the step of its
    first token fails; cancelled-in-failed-step: the call goes away while the prompt's failing
    step runs; withdrawn: the call goes away while its row waits for a step (another
    session's step holds the runner)."""
    if how == "failed":
        with slow_steps(engine, seconds=0.0, fail=True), pytest.raises(RuntimeError):
            await _generate(engine, session_id)
        return
    if how == "first-token-failed":  # no prompt: its first token's step fails
        with slow_steps(engine, seconds=0.0, fail=True), pytest.raises(Internal):
            await _generate(engine, session_id, prompt=False)
        return
    with slow_steps(engine, fail=how == "cancelled-in-failed-step") as in_step:
        busy = None
        if how == "withdrawn":
            other, _ = await engine.create_session("tok")
            busy = asyncio.create_task(engine.feed(other.session_id, toks(1)))
            await asyncio.wait_for(in_step.wait(), 5)
            in_step.clear()
        call = asyncio.create_task(_generate(engine, session_id))
        if how == "withdrawn":
            await asyncio.sleep(0.05)  # its GEN_START journaled, its row queued
            assert not in_step.is_set()
        else:
            await asyncio.wait_for(in_step.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        if busy is not None:
            await busy
    session = engine.get_session(session_id)
    await settled(session, 2)


@pytest.mark.parametrize("checkpoint_steps", [1000, 1], ids=["journal-only", "checkpointed"])
@pytest.mark.parametrize(
    "how", ["failed", "first-token-failed", "cancelled-in-failed-step", "withdrawn"]
)
async def test_a_generation_whose_prompt_was_not_applied_changes_no_reply_after_a_crash(
    make_engine: EngineFactory, tmp_path: Path, checkpoint_steps: int, how: str
) -> None:
    """Step r1, then g1 whose prompt is never applied (its GEN_START is in the journal), then
    a crash: the retry of r1 gets r1's reply and applies nothing (recovery made g1 the last
    request, so the retry was refused with a position mismatch); g1 then applies anew, with
    the tokens of a generation that was never interrupted."""
    spill = tmp_path / "state"
    first = await make_engine(
        spill_dir=spill, checkpoint_steps=checkpoint_steps, engine={"inline_max_rows": 0}
    )
    roomy = await make_engine(durability="shutdown")
    session, _ = await first.create_session("tok", seed=5)
    twin, _ = await roomy.create_session("tok", seed=5)
    sid = session.session_id
    original = await first.feed(sid, toks(1, 2), OPTIONS, expected_position=0, request_id="r1")
    await roomy.feed(twin.session_id, toks(1, 2))
    await _not_applied(first, sid, how)
    await crash(first)
    journal = b"".join(p.read_bytes() for p in sorted((spill / "journal").glob("*.log")))
    kinds = [r.kind for r in js.decode_stream(journal) if r.session_id == sid]
    assert kinds[-1] == jr.GEN_START, "the case: g1's start journaled, nothing after it"

    second = await make_engine(spill_dir=spill, checkpoint_steps=checkpoint_steps)
    retried = await second.feed(sid, toks(1, 2), OPTIONS, expected_position=0, request_id="r1")
    assert retried.position == original.position == 2
    assert close(retried.prediction, original.prediction)
    assert second.get_session(sid).position == 2  # nothing applied again
    got = await _generate(second, sid)
    want = await _generate(roomy, twin.session_id)
    assert [t.position for t in got] == [5, 6, 7]
    assert [t.token_id for t in got] == [t.token_id for t in want]


async def test_a_generation_cancelled_once_its_prompt_applied_is_continued_after_a_crash(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """The call goes away while its prompt's step runs, and the step applies the prompt: no
    token yet, but g1 is the session's last request, in memory and after a crash alike. Its
    retry continues it (the retry of r1 is refused: something applied after it)."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, engine={"inline_max_rows": 0})
    roomy = await make_engine(durability="shutdown")
    session, _ = await first.create_session("tok", seed=5)
    twin, _ = await roomy.create_session("tok", seed=5)
    sid = session.session_id
    await first.feed(sid, toks(1, 2), expected_position=0, request_id="r1")
    await roomy.feed(twin.session_id, toks(1, 2))
    with slow_steps(first) as in_step:
        call = asyncio.create_task(_generate(first, sid))
        await asyncio.wait_for(in_step.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await settled(session, 4)
    await crash(first)

    second = await make_engine(spill_dir=spill)
    assert second.get_session(sid).position == 4
    got = await _generate(second, sid)
    want = await _generate(roomy, twin.session_id)
    assert [t.position for t in got] == [5, 6, 7]
    assert [t.token_id for t in got] == [t.token_id for t in want]


async def test_a_generation_whose_first_token_failed_leaves_the_last_request_as_it_was(
    make_engine: EngineFactory,
) -> None:
    """In memory, as after a crash: a generation without a prompt whose first step failed
    applied nothing, so the retry of the Step before it gets its reply (it was refused: the
    generation was remembered before its first token)."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    session, _ = await engine.create_session("tok")
    sid = session.session_id
    first = await engine.feed(sid, toks(1, 2), OPTIONS, expected_position=0, request_id="r1")
    await _not_applied(engine, sid, "first-token-failed")
    again = await engine.feed(sid, toks(1, 2), OPTIONS, expected_position=0, request_id="r1")
    assert again.position == first.position == 2 == session.position
    assert close(again.prediction, first.prediction)


async def test_a_generation_without_a_prompt_cancelled_in_its_first_step_is_continued(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """The call goes away while its first token's step runs, which applies the token: g1 is
    the last request (remembered when the step applied it), in memory and after a crash; its
    retry sends that token again and continues with the tokens of an uninterrupted one."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, engine={"inline_max_rows": 0})
    roomy = await make_engine(durability="shutdown")
    session, _ = await first.create_session("tok", seed=5)
    twin, _ = await roomy.create_session("tok", seed=5)
    sid = session.session_id
    await first.feed(sid, toks(1, 2), expected_position=0, request_id="r1")
    await roomy.feed(twin.session_id, toks(1, 2))
    want = await _generate(roomy, twin.session_id, prompt=False)
    with slow_steps(first) as in_step:
        call = asyncio.create_task(_generate(first, sid, prompt=False))
        await asyncio.wait_for(in_step.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await settled(session, 3)
    in_memory = await _generate(first, sid, prompt=False)
    assert [t.token_id for t in in_memory] == [t.token_id for t in want]
    await crash(first)

    second = await make_engine(spill_dir=spill)
    again = await _generate(second, sid, prompt=False)
    assert [t.position for t in again] == [3, 4, 5]
    assert [t.token_id for t in again] == [t.token_id for t in want]

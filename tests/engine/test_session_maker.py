"""SessionMaker: creates and forks exactly once per request id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.engine.model_input import ModelInput
from service.errors import InvalidArgument
from service.sessions.session import Session
from tests.polling import until

from .conftest import EngineFactory, crash, slow_steps, toks


async def test_concurrent_creates_with_one_request_id_make_one_session(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    made = await asyncio.gather(
        *(engine.create_session("tok", prefix=toks(1, 2), request_id="same") for _ in range(4))
    )
    assert len({session.session_id for session, _ in made}) == 1
    assert len(engine.sessions) == 1
    assert all(outcome is not None and outcome.position == 2 for _, outcome in made)


async def test_a_create_cancelled_while_its_prefix_steps_leaves_no_orphan_and_is_retried(
    make_engine: EngineFactory,
) -> None:
    """Cancelled after the prefix's row went into a step: without a request id nobody can ever
    name the session, so it ends once the step settles; with one, the retry finds the session
    and the prefix's prediction."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    await engine.create_session("tok")  # the version loaded
    for request_id in ("", "c1"):
        with slow_steps(engine) as in_step:
            call = asyncio.create_task(
                engine.create_session("tok", prefix=toks(1, 2, 3), request_id=request_id)
            )
            await asyncio.wait_for(in_step.wait(), 5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            if request_id:  # a retry at once: it waits for the step, then answers
                again, outcome = await engine.create_session(
                    "tok", prefix=toks(1, 2, 3), request_id=request_id
                )
                assert again.position == 3 and outcome is not None and outcome.position == 3
        want = 2 if request_id else 1
        await until(  # a loaded host may take seconds
            lambda want=want: len(engine.sessions) == want, 60, f"{want} sessions in the engine"
        )


async def test_a_request_id_reused_for_another_create_or_fork_is_refused(
    make_engine: EngineFactory,
) -> None:
    """A retry repeats its request: the id of a fork of one session, reused to fork another,
    is not answered with the first fork (a wrong session, silently)."""
    engine = await make_engine()
    a, _ = await engine.create_session("tok", request_id="c1")
    with pytest.raises(InvalidArgument, match="create of model 'tok'"):
        await engine.create_session("frames", request_id="c1")
    b, _ = await engine.create_session("tok", prefix=toks(1, 2))
    child = await engine.fork_session(a.session_id, request_id="f1")
    with pytest.raises(InvalidArgument, match="fork of another session"):
        await engine.fork_session(b.session_id, request_id="f1")
    assert (await engine.fork_session(a.session_id, request_id="f1")).session_id == (
        child.session_id
    )


async def test_a_retry_that_adds_a_prefix_its_first_call_did_not_carry_is_refused(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Before, it found the session unfed, took it for a first call whose prefix never ran, and
    fed the prefix: a second request applied under one request id. Refused, also after a crash
    (the creation record says so), and the session is left as it was; a retry that repeats the
    request still gets the first call's session."""
    spill = tmp_path / "state"
    engine = await make_engine(spill_dir=spill)
    made, outcome = await engine.create_session("tok", request_id="c1")
    assert outcome is None
    for attempt in range(2):
        with pytest.raises(InvalidArgument, match="was used for a create without a prefix"):
            await engine.create_session("tok", prefix=toks(1, 2), request_id="c1")
        assert engine.get_session(made.session_id).position == 0
        again, _ = await engine.create_session("tok", request_id="c1")
        assert again.session_id == made.session_id
        if attempt == 0:
            await crash(engine)
            engine = await make_engine(spill_dir=spill)
    prefixed, _ = await engine.create_session("tok", prefix=toks(1), request_id="c2")
    retried, outcome = await engine.create_session("tok", prefix=toks(1), request_id="c2")
    assert retried.session_id == prefixed.session_id
    assert outcome is not None and outcome.position == 1


async def test_a_retry_that_drops_the_prefix_its_first_call_carried_is_refused(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Before, it was answered with the session and the first call's outcome: a different
    request accepted under one request id. Refused in memory, after a crash (the creation
    record says the create carried a prefix), and after a crash once the session was
    checkpointed (the checkpoint does not say; the prefix's outcome, still the session's last
    request, does). The session is left as it was, and a retry that repeats the request still
    gets the first call's session and outcome."""
    spill = tmp_path / "state"
    quiet = {"checkpoint_steps": 1000, "checkpoint_idle_seconds": 3600.0}
    engine = await make_engine(spill_dir=spill, **quiet)
    journaled, _ = await engine.create_session("tok", prefix=toks(1, 2), request_id="c1")
    checkpointed, _ = await engine.create_session("tok", prefix=toks(3, 4, 5), request_id="c2")

    async def refused_then_repeated(made: Session, request_id: str, prefix: ModelInput) -> None:
        with pytest.raises(InvalidArgument, match="was used for a create with a prefix"):
            await engine.create_session("tok", request_id=request_id)
        assert engine.get_session(made.session_id).position == prefix.size()
        again, outcome = await engine.create_session("tok", prefix=prefix, request_id=request_id)
        assert again.session_id == made.session_id
        assert outcome is not None and outcome.position == prefix.size()

    await refused_then_repeated(journaled, "c1", toks(1, 2))
    engine.residency.writer.checkpoint(engine.sessions.get(checkpointed.session_id))
    await crash(engine)
    engine = await make_engine(spill_dir=spill, **quiet)
    assert engine.get_session(checkpointed.session_id).prefixed is None  # the checkpoint's
    await refused_then_repeated(journaled, "c1", toks(1, 2))
    await refused_then_repeated(checkpointed, "c2", toks(3, 4, 5))
    bare, _ = await engine.create_session("tok", request_id="c3")  # no prefix: retried as made
    assert (await engine.create_session("tok", request_id="c3"))[0].session_id == bare.session_id


async def test_a_create_cancelled_while_its_prefix_step_fails_is_made_anew_by_its_retry(
    make_engine: EngineFactory,
) -> None:
    """The step the cancelled create's prefix was in failed: nothing was applied, so the
    session it made is ended, and the retry makes one with the prefix (it returned the empty
    session, at position 0 with no prediction, as if made)."""
    engine = await make_engine(engine={"inline_max_rows": 0})
    await engine.create_session("tok")  # the version loaded
    with slow_steps(engine, fail=True) as in_step:
        call = asyncio.create_task(
            engine.create_session("tok", prefix=toks(1, 2, 3), request_id="c1")
        )
        await asyncio.wait_for(in_step.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    # The step still runs (and fails); the retry waits for it, then makes the session anew.
    again, outcome = await engine.create_session("tok", prefix=toks(1, 2, 3), request_id="c1")
    assert again.position == 3 and outcome is not None and outcome.position == 3
    assert len(engine.sessions) == 2

"""Where the step scheduler runs a batch: a lone one-input row on the event-loop thread (the
thread handoff costs more than the step), anything else — chunks included — on the runner
thread, so a long chunk never stalls the loop."""

from __future__ import annotations

import threading

import pytest

from service.engine.session_engine import ModelInput
from service.errors import Unavailable
from service.runtime.step_batch import StepBatch

from .conftest import EngineFactory


@pytest.mark.parametrize(
    ("tokens", "inline_max_rows", "on_loop_thread"),
    [([7], 1, True), ([7, 8, 9, 10, 11], 1, False), ([7], 0, False)],
)
async def test_which_thread_runs_the_step(
    make_engine: EngineFactory, tokens: list[int], inline_max_rows: int, on_loop_thread: bool
) -> None:
    engine = await make_engine(engine={"inline_max_rows": inline_max_rows})
    session, _ = await engine.create_session("tok")
    version = engine.versions.find("tok", 1)
    assert version is not None
    threads: list[threading.Thread] = []
    execute = version.runner.execute

    def spy(batch: StepBatch):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread())
        return execute(batch)

    version.runner.execute = spy  # type: ignore[method-assign]
    outcome = await engine.step(session.session_id, ModelInput(tokens=tokens))
    assert outcome.position == len(tokens)
    assert threads == [threading.current_thread()] if on_loop_thread else threads != []
    assert all((t is threading.current_thread()) == on_loop_thread for t in threads)


async def test_a_generation_refused_at_start_leaves_the_session_free(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    session, _ = await engine.create_session("tok", prefix=ModelInput(tokens=[1]))
    version = engine.versions.find("tok", 1)
    assert version is not None
    await version.scheduler.stop()  # e.g. the version is being unloaded
    with pytest.raises(Unavailable):
        async for _ in engine.generate(session.session_id):
            pass
    assert not session.busy

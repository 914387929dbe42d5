"""When a session's checkpoint comes due: after `checkpoint_steps` journaled steps, the first
one sooner by up to half of that, by the session's id (DESIGN section 10)."""

from __future__ import annotations

import asyncio

from .conftest import EngineFactory, toks

STEPS = 16


async def _steps_checkpointed_at(make_engine: EngineFactory, sessions: int, rounds: int):  # type: ignore[no-untyped-def]
    """Sessions created together, all fed one token per round together: for each, the rounds
    after which its journaled steps were in a checkpoint."""
    engine = await make_engine(checkpoint_steps=STEPS)
    ids = [(await engine.create_session("tok"))[0].session_id for _ in range(sessions)]
    at: dict[str, list[int]] = {s: [] for s in ids}
    for round_ in range(1, rounds + 1):
        await asyncio.gather(*(engine.feed(s, toks(round_ % 256)) for s in ids))
        await asyncio.sleep(0)  # the leases are let go (and checkpoints written) after replies
        for s in ids:
            session = engine.get_session(s)
            assert session.unsaved_steps <= STEPS  # the bound on what recovery replays
            if session.unsaved_steps == 0:
                at[s].append(round_)
    return at


async def test_sessions_stepped_together_are_checkpointed_at_different_steps(
    make_engine: EngineFactory,
) -> None:
    at = await _steps_checkpointed_at(make_engine, sessions=64, rounds=3 * STEPS)
    firsts = [steps[0] for steps in at.values()]
    assert all(STEPS - STEPS // 2 <= first <= STEPS for first in firsts)
    # 64 ids over 9 possible first steps: spread, not one burst of 64 checkpoints
    assert len(set(firsts)) >= 5
    assert max(firsts.count(first) for first in set(firsts)) < 32
    for steps in at.values():  # then every STEPS steps: they stay spread
        assert steps == list(range(steps[0], 3 * STEPS + 1, STEPS))


async def test_first_checkpoint_step_is_the_same_for_an_id(make_engine: EngineFactory) -> None:
    """The spread comes from the id, not chance: a session recovered, or the same id on
    another replica, comes due where it did."""
    engine = await make_engine(checkpoint_steps=STEPS)
    durability = engine.durability
    ids = [f"s{i:03d}" for i in range(200)]
    assert [durability._first_due(s) for s in ids] == [durability._first_due(s) for s in ids]
    assert {durability._first_due(s) for s in ids} == set(range(STEPS // 2, STEPS + 1))

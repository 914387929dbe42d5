"""When a session's checkpoint comes due (DESIGN section 10): after `checkpoint_steps` journaled
steps; sooner, by up to half of that and by the session's id, when its last write was not one
of these (none yet, an idle checkpoint, an eviction), so sessions stepped together are not
checkpointed in one burst."""

from __future__ import annotations

import asyncio

from service.engine.session_engine import SessionEngine

from .conftest import EngineFactory, toks

STEPS = 16


async def _rounds_checkpointed_after(
    engine: SessionEngine, ids: list[str], rounds: int
) -> dict[str, list[int]]:
    """Sessions all fed one token per round together: for each, the rounds after which its
    journaled steps were in a checkpoint."""
    at: dict[str, list[int]] = {s: [] for s in ids}
    for round_ in range(1, rounds + 1):
        await asyncio.gather(*(engine.feed(s, toks(round_ % 256)) for s in ids))
        for s in ids:
            session = engine.get_session(s)
            assert session.unsaved_steps <= STEPS  # the bound on what recovery replays
            if session.unsaved_steps == 0:
                at[s].append(round_)
    return at


def assert_spread(firsts: list[int]) -> None:
    """64 sessions' first checkpoints: over 9 possible steps, not one burst of 64 files."""
    assert all(STEPS - STEPS // 2 <= first <= STEPS for first in firsts)
    assert len(set(firsts)) >= 5
    assert max(firsts.count(first) for first in set(firsts)) < 32


async def test_sessions_stepped_together_are_checkpointed_at_different_steps(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(checkpoint_steps=STEPS)
    ids = [(await engine.create_session("tok"))[0].session_id for _ in range(64)]
    at = await _rounds_checkpointed_after(engine, ids, rounds=3 * STEPS)
    assert_spread([steps[0] for steps in at.values()])
    for steps in at.values():  # then every STEPS steps: they stay spread
        assert steps == list(range(steps[0], 3 * STEPS + 1, STEPS))


async def test_sessions_checkpointed_together_while_idle_are_spread_again(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(checkpoint_steps=STEPS)
    ids = [(await engine.create_session("tok"))[0].session_id for _ in range(64)]
    await _rounds_checkpointed_after(engine, ids, rounds=3 * STEPS + 1)  # none just written
    assert await engine.idle_checkpoints.sweep(0.0) == 64  # all written together, idle
    at = await _rounds_checkpointed_after(engine, ids, rounds=2 * STEPS)
    assert_spread([steps[0] for steps in at.values()])


async def test_first_checkpoint_step_is_the_same_for_an_id(make_engine: EngineFactory) -> None:
    """The spread comes from the id, not chance: a session recovered, or the same id on
    another replica, comes due where it did."""
    engine = await make_engine(checkpoint_steps=STEPS)
    durability = engine.durability
    ids = [f"s{i:03d}" for i in range(200)]
    assert [durability._first_due(s) for s in ids] == [durability._first_due(s) for s in ids]
    assert {durability._first_due(s) for s in ids} == set(range(STEPS // 2, STEPS + 1))

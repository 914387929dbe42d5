"""StatePool.compact: unused capacity goes back to the shared budget, moved state stays intact,
and slots that may be in a running step never move."""

from __future__ import annotations

import torch

from service.runtime.state_pool import ByteBudget, StatePool

from .conftest import TOK, TOK_SLOT_BYTES


def _head(h_top: torch.Tensor) -> torch.Tensor:
    """A stand-in head: twice the first unit of the top layer, across the vocabulary."""
    return (2 * h_top[:, :1]).expand(-1, TOK.output_dim)  # [B, out]


def _pool(slots: int, budget: ByteBudget) -> StatePool:
    return StatePool(TOK, budget, initial_slots=slots, head=_head)


def _mark(pool: StatePool, slot: int, value: float) -> None:
    pool.h[:, slot] = value
    assert pool.c is not None
    pool.c[:, slot] = -value


def _value(pool: StatePool, slot: int) -> float:
    snap = pool.snapshot(slot)
    assert snap.c is not None
    v = float(snap.h[0, 0])
    assert (snap.h == v).all() and (snap.c == -v).all()
    assert (pool.outputs(pool.h[-1, slot : slot + 1]) == 2 * v).all()  # what it predicts
    return v


def test_compact_moves_idle_slots_down_and_releases_the_tail() -> None:
    budget = ByteBudget(8 * TOK_SLOT_BYTES)
    pool = _pool(8, budget)
    slots = [pool.allocate() for _ in range(8)]
    assert slots == list(range(8)) and budget.used_bytes == 8 * TOK_SLOT_BYTES
    for s in slots:
        _mark(pool, s, float(s + 1))
    for s in (0, 2, 3, 5):
        pool.free(s)
    moves = pool.compact(movable=[6, 7])  # 1 and 4 are busy: they stay where they are
    # Slot 4 must stay, so the pool keeps 5 slots: 1 and 4 in place, 6 and 7 moved to 0 and 2.
    assert moves == {6: 0, 7: 2}
    assert pool.capacity == 5 and budget.used_bytes == 5 * TOK_SLOT_BYTES
    assert (_value(pool, 1), _value(pool, 4)) == (2.0, 5.0)
    assert (_value(pool, 0), _value(pool, 2)) == (7.0, 8.0)
    assert pool.used_slots == 4
    assert pool.allocate() == 3  # the one hole left


def test_a_busy_slot_at_the_top_limits_the_shrink() -> None:
    budget = ByteBudget(8 * TOK_SLOT_BYTES)
    pool = _pool(8, budget)
    for _ in range(8):
        pool.allocate()
    for s in range(1, 7):
        pool.free(s)
    _mark(pool, 7, 5.0)
    assert pool.compact(movable=[]) == {}  # slot 7 is in use and may not move: no shrink
    assert pool.capacity == 8
    assert pool.compact(movable=[7]) == {7: 1}
    assert pool.capacity == 2 and _value(pool, 1) == 5.0
    assert budget.used_bytes == 2 * TOK_SLOT_BYTES


def test_an_empty_pool_shrinks_to_nothing_and_grows_again() -> None:
    budget = ByteBudget(4 * TOK_SLOT_BYTES)
    pool = _pool(4, budget)
    pool.compact(movable=[])
    assert pool.capacity == 0 and budget.used_bytes == 0
    slot = pool.allocate()
    assert slot == 0 and pool.capacity == 4  # growth is at least the initial slots
    assert float(pool.h[:, slot].abs().sum()) == 0.0


def test_floor_is_the_least_compact_can_leave_once_the_movable_slots_are_freed() -> None:
    budget = ByteBudget(8 * TOK_SLOT_BYTES)
    pool = _pool(8, budget)
    for _ in range(6):
        pool.allocate()  # slots 0-5 in use, 6 and 7 free
    assert pool.floor(movable=[]) == 6
    assert pool.floor(movable=[3, 4, 5]) == 3  # 2 is the highest that stays put
    assert pool.floor(movable=range(6)) == 0
    pool.free(5)
    assert pool.floor(movable=[4]) == 4
    for s in range(4):
        pool.free(s)  # only 4 is in use: freeing it leaves nothing
    assert (pool.floor(movable=[]), pool.floor(movable=[4])) == (5, 0)
    assert pool.capacity == 8  # floor only reads the pool
    pool.compact(movable=[])
    assert pool.capacity == 5  # what floor said, with slot 4 pinned

"""StatePool and ByteBudget: slots handed out, freed and reused; growth by an eighth (at least the
initial slots) while the shared byte budget allows and ResourceExhausted past it; a slot holds
only h (and c), its output computed from the top layer's h; zeroed reallocated slots; bit-exact
snapshot / restore; gather / scatter by slot; compact(); close()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.errors import ResourceExhausted
from service.models import ModelConfig, RecurrentState
from service.runtime import reserved_memory, state_pool
from service.runtime.state_pool import ByteBudget, SlotSnapshot, StatePool

from .conftest import CELL_IDS, CELLS, random_snapshot, token_config

LSTM = token_config("lstm")  # 2 layers, H = 16, vocabulary 40
GRU = token_config("gru", reset_after=False)
# 4 bytes per float: LSTM h and c (2 layers x 16 each); GRU h only. No outputs are kept.
LSTM_SLOT_BYTES = 4 * (2 * 2 * 16)
GRU_SLOT_BYTES = 4 * (2 * 16)


def _initial(config: ModelConfig) -> torch.Tensor:
    """A recognisable, nonzero initial output, so "reset" is told apart from "zeroed"."""
    return torch.arange(config.output_dim, dtype=torch.float32) * 0.25 - 3.0


def _head(config: ModelConfig):  # type: ignore[no-untyped-def]
    """A stand-in head, top-layer h [B, H] → [B, out]: the initial output plus twice the first
    unit (so head(zeros) is the initial output, and a filled slot's output is recognisable)."""
    return lambda h: _initial(config) + 2 * h[:, :1]


def _pool(config: ModelConfig, budget: ByteBudget, slots: int) -> StatePool:
    return StatePool(config, budget, initial_slots=slots, head=_head(config))


def _expected_last(config: ModelConfig, h: np.ndarray) -> np.ndarray:
    """What a slot with top-layer state h[-1] predicts: the stand-in head's output."""
    return (_head(config)(torch.from_numpy(h[-1:]))[0]).numpy()


def _out(pool: StatePool, slot: int) -> np.ndarray:
    """What the slot predicts now: the pool's head over its top-layer h."""
    return pool.outputs(pool.h[-1, slot : slot + 1])[0].numpy()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _assert_same_bits(a: SlotSnapshot, b: SlotSnapshot) -> None:
    """The same state, bit for bit."""
    np.testing.assert_array_equal(_bits(a.h), _bits(b.h))
    assert (a.c is None) == (b.c is None)
    if a.c is not None:
        assert b.c is not None
        np.testing.assert_array_equal(_bits(a.c), _bits(b.c))


def _fill(pool: StatePool, slot: int, value: float) -> None:
    """Every float of the slot set to `value` (c to -value)."""
    pool.restore(
        slot,
        SlotSnapshot(
            h=np.full((pool.config.num_layers, pool.config.hidden_size), value, np.float32),
            c=None
            if pool.c is None
            else np.full((pool.config.num_layers, pool.config.hidden_size), -value, np.float32),
        ),
    )


def _value(pool: StatePool, slot: int) -> float:
    """The value `_fill` wrote into the slot (checking every float of it)."""
    snap = pool.snapshot(slot)
    v = float(snap.h.flat[0])
    assert (snap.h == v).all()
    np.testing.assert_array_equal(_out(pool, slot), _initial(pool.config).numpy() + 2 * v)
    if snap.c is not None:
        assert (snap.c == -v).all()
    return v


# ---- sizes and the budget ---------------------------------------------------------------------


@pytest.mark.parametrize(("config", "expected"), [(LSTM, LSTM_SLOT_BYTES), (GRU, GRU_SLOT_BYTES)])
def test_a_slot_costs_its_state_in_float32_and_nothing_more(
    config: ModelConfig, expected: int
) -> None:
    budget = ByteBudget(1 << 20)
    pool = _pool(config, budget, slots=3)
    assert pool.bytes_per_slot == expected
    assert pool.capacity == 3 and pool.nbytes == 3 * expected
    assert budget.used_bytes == 3 * expected  # the pool reserved exactly what it holds
    assert tuple(pool.h.shape) == (2, 3, 16)
    assert (pool.c is not None) == config.has_cell_state
    assert not hasattr(pool, "last")  # no output cache per slot


def test_byte_budget_reserves_up_to_its_limit_and_takes_releases_back() -> None:
    budget = ByteBudget(100)
    assert budget.try_reserve(60)
    assert not budget.try_reserve(41)  # 101 > 100: refused, and nothing is reserved
    assert budget.used_bytes == 60
    assert budget.try_reserve(40)  # exactly the limit fits
    assert not budget.try_reserve(1)
    budget.release(30)
    assert budget.used_bytes == 70
    assert budget.try_reserve(30) and budget.used_bytes == 100


def test_a_large_pool_grows_by_an_eighth_so_little_of_it_is_ever_unused() -> None:
    """Doubling left up to half of a big pool unused (100,000 sessions in 131,072 slots);
    growing by max(initial slots, capacity / 8) leaves at most an eighth."""
    budget = ByteBudget(1 << 30)
    pool = _pool(GRU, budget, slots=8)
    capacities = []
    for n in range(1, 2001):
        pool.allocate()
        if pool.capacity not in capacities:
            capacities.append(pool.capacity)
        assert pool.capacity - n <= max(8, pool.capacity // 8), (n, pool.capacity)
    assert capacities[:9] == [8, 16, 24, 32, 40, 48, 56, 64, 72]
    assert capacities[9:11] == [81, 91]  # 72 + 72 // 8, 81 + 81 // 8
    assert budget.used_bytes == pool.capacity * GRU_SLOT_BYTES


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_growing_on_the_cpu_copies_nothing() -> None:
    """The pool's h and c are views of storage mapped once for the whole budget: a growth is a
    longer view, so what was there stays where it was (a copy stalled the event loop for
    ~200 ms at 90,000 slots)."""
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=4)
    for s in range(4):
        pool.allocate()
        _fill(pool, s, float(s + 1))
    h, c = pool.h, pool.c
    assert c is not None
    assert pool.allocate() == 4 and pool.capacity == 8  # grown
    assert pool.h.data_ptr() == h.data_ptr() and pool.c is not None
    assert pool.c.data_ptr() == c.data_ptr()  # the same memory, not a copy
    assert [_value(pool, s) for s in range(5)] == [1.0, 2.0, 3.0, 4.0, 0.0]
    _fill(pool, 1, 7.0)
    assert float(h[0, 1, 0]) == 7.0  # a view taken before the growth sees writes after it


def test_the_storage_costs_memory_only_as_slots_are_written() -> None:
    """Sized for a 512 MB budget, a pool of four slots adds a few pages to the process, not
    the budget (the mapping reserves no memory; unwritten pages are zeros)."""
    before = _rss_bytes()
    pool = _pool(LSTM, ByteBudget(512 << 20), slots=4)
    for s in range(4):
        pool.allocate()
        _fill(pool, s, 1.0)
    assert _rss_bytes() - before < (32 << 20)
    assert pool.capacity == 4 and float(pool.h.sum()) == 4 * 2 * 16


def test_where_the_mapping_is_refused_the_pool_grows_by_copying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_pool, "reserved_zeros", lambda shape: None)
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=2)
    for s in range(2):
        pool.allocate()
        _fill(pool, s, float(s + 1))
    h = pool.h
    assert pool.allocate() == 2 and pool.capacity == 4
    assert pool.h.data_ptr() != h.data_ptr()  # copied into a bigger tensor
    assert [_value(pool, s) for s in range(3)] == [1.0, 2.0, 0.0]
    pool.free(0)
    assert pool.compact(movable=[2]) == {2: 0}
    assert pool.capacity == 2 and [_value(pool, s) for s in range(2)] == [0.0, 2.0]


def test_a_growth_after_a_compaction_copies_nothing_and_its_slots_read_zero() -> None:
    """Compaction maps fresh storage (the old one, freed tail and all, goes back to the
    kernel); later growths are views of it again, and the slots the tail held read zero."""
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=4)
    for s in range(8):
        pool.allocate()
        _fill(pool, s, float(s + 1))
    for s in range(2, 8):
        pool.free(s)
    assert pool.compact(movable=[]) == {} and pool.capacity == 2
    h = pool.h
    for s in range(2, 8):
        assert pool.allocate() == s
    assert pool.h.data_ptr() == h.data_ptr()  # grown in place, not copied
    assert [_value(pool, s) for s in range(8)] == [1.0, 2.0] + [0.0] * 6


def test_gather_and_scatter_index_contiguous_storage() -> None:
    """`index_select` of the pool's view (not contiguous once the mapping holds more slots than
    the pool) copies the whole view first: 21.6 ms for a 64-row gather at 20,000 slots. Every
    index operation of a step must run on contiguous storage."""
    seen: list[tuple[str, bool]] = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = getattr(func, "__name__", "")
            if name in ("index_select", "index_copy_"):
                seen.append((name, args[0].is_contiguous()))
            return func(*args, **(kwargs or {}))

    pool = _pool(LSTM, ByteBudget(1 << 20), slots=4)
    for _ in range(6):  # grown once: the view is narrower than the mapping
        pool.allocate()
    assert not pool.h.is_contiguous()  # the case that matters
    with Record():
        state = pool.gather(pool.index([5, 0]))
        pool.scatter(pool.index([5, 0]), state)
        pool.snapshots([1, 2])
    assert seen and all(contiguous for _, contiguous in seen), seen


def test_a_slot_outside_the_pool_is_refused_not_written() -> None:
    """The storage reaches past the pool: a stray slot there would be written silently and
    handed out later as a fresh one. It is an IndexError instead."""
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=3)
    for _ in range(3):
        pool.allocate()
    for bad in ([3], [0, 3], [-1]):
        with pytest.raises(IndexError):
            pool.index(bad)
    with pytest.raises(IndexError):
        pool.snapshots([0, 3])
    assert pool.index([]).numel() == 0


def test_where_the_address_space_is_limited_the_pool_does_not_map_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every pool maps its whole budget: under `ulimit -v` that would use the address space
    up, so there the pool grows by copying."""
    monkeypatch.setattr(reserved_memory.resource, "getrlimit", lambda which: (1 << 33, 1 << 33))
    assert not reserved_memory.mapping_allowed()
    assert reserved_memory.reserved_zeros((2, 4, 16)) is None
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=2)
    h = pool.h
    pool.allocate()
    pool.allocate()
    pool.allocate()  # grown
    assert pool.capacity == 4 and pool.h.data_ptr() != h.data_ptr()


# ---- allocate / free / reuse ------------------------------------------------------------------


def test_slots_are_handed_out_low_first_and_a_freed_slot_is_reused_before_growing() -> None:
    budget = ByteBudget(1 << 20)
    pool = _pool(LSTM, budget, slots=4)
    assert [pool.allocate() for _ in range(4)] == [0, 1, 2, 3]
    assert pool.used_slots == 4 and pool.capacity == 4
    pool.free(2)
    assert pool.used_slots == 3
    assert pool.allocate() == 2  # the freed slot, not a new one
    assert pool.capacity == 4 and budget.used_bytes == 4 * LSTM_SLOT_BYTES
    pool.free(1)
    pool.free(3)
    assert {pool.allocate(), pool.allocate()} == {1, 3}
    assert pool.capacity == 4 and pool.used_slots == 4


def test_double_free_and_free_of_an_unknown_slot_are_refused() -> None:
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=2)
    slot = pool.allocate()
    pool.free(slot)
    with pytest.raises(AssertionError, match="bad free"):
        pool.free(slot)
    with pytest.raises(AssertionError, match="bad free"):
        pool.free(1)  # never allocated
    with pytest.raises(AssertionError, match="bad free"):
        pool.free(2)  # past the capacity
    assert pool.used_slots == 0 and pool.allocate() == slot


def test_the_pool_grows_while_the_budget_allows_then_takes_what_fits_then_refuses() -> None:
    budget = ByteBudget(6 * LSTM_SLOT_BYTES)
    pool = _pool(LSTM, budget, slots=2)
    got = [pool.allocate() for _ in range(2)]
    assert pool.capacity == 2
    got.append(pool.allocate())  # full: grows by the initial 2 slots, to 4
    assert pool.capacity == 4 and budget.used_bytes == 4 * LSTM_SLOT_BYTES
    got.append(pool.allocate())
    got.append(pool.allocate())  # 2 more fit, exactly
    assert pool.capacity == 6 and budget.used_bytes == 6 * LSTM_SLOT_BYTES
    got.append(pool.allocate())
    assert got == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ResourceExhausted, match="budget exhausted"):
        pool.allocate()
    # The refusal changed nothing, and a freed slot is still handed out.
    assert pool.capacity == 6 and pool.used_slots == 6
    assert budget.used_bytes == 6 * LSTM_SLOT_BYTES
    pool.free(4)
    assert pool.allocate() == 4


def test_an_initial_size_over_the_budget_gets_what_fits_and_growth_is_exact() -> None:
    budget = ByteBudget(3 * LSTM_SLOT_BYTES)
    pool = _pool(LSTM, budget, slots=64)  # 64, 32, ... 4 do not fit; 2 does
    assert pool.capacity == 2 and budget.used_bytes == 2 * LSTM_SLOT_BYTES
    pool.allocate()
    pool.allocate()
    assert pool.allocate() == 2  # one more slot fits, though growing by 64 does not
    assert pool.capacity == 3 and budget.used_bytes == budget.limit_bytes
    with pytest.raises(ResourceExhausted):
        pool.allocate()


def test_a_pool_with_no_budget_is_built_empty_and_refuses_to_allocate() -> None:
    budget = ByteBudget(LSTM_SLOT_BYTES - 1)
    pool = _pool(LSTM, budget, slots=4)
    assert pool.capacity == 0 and budget.used_bytes == 0
    with pytest.raises(ResourceExhausted):
        pool.allocate()


def test_pools_share_one_budget() -> None:
    budget = ByteBudget(4 * LSTM_SLOT_BYTES + 2 * GRU_SLOT_BYTES)
    a = _pool(LSTM, budget, slots=4)
    b = _pool(GRU, budget, slots=2)
    assert budget.used_bytes == budget.limit_bytes
    for _ in range(2):
        b.allocate()
    with pytest.raises(ResourceExhausted):
        b.allocate()  # the LSTM pool holds the rest
    a.close()
    assert budget.used_bytes == 2 * GRU_SLOT_BYTES  # only the LSTM pool's bytes came back
    assert b.allocate() == 2 and b.capacity == 4


# ---- contents of slots ------------------------------------------------------------------------


@pytest.mark.parametrize("config", [LSTM, GRU], ids=["lstm", "gru"])
def test_a_reallocated_slot_is_zeroed_and_predicts_the_initial_output(config: ModelConfig) -> None:
    pool = _pool(config, ByteBudget(1 << 20), slots=4)
    slots = [pool.allocate() for _ in range(3)]
    for s in slots:
        _fill(pool, s, float(s + 1))
    pool.free(1)
    assert pool.allocate() == 1
    snap = pool.snapshot(1)
    assert not snap.h.any()
    if config.has_cell_state:
        assert snap.c is not None and not snap.c.any()
    else:
        assert snap.c is None
    np.testing.assert_array_equal(_out(pool, 1), _initial(config).numpy())
    assert (_value(pool, 0), _value(pool, 2)) == (1.0, 3.0)  # neighbours untouched


def test_only_a_slot_that_held_state_is_zeroed_when_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slots the pool grew to are zeros until first handed out: those are not zeroed again. A
    slot that held state is, and so is every slot a compaction kept (its moves write slots)."""
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=4)
    zeroed: list[int] = []
    reset = pool.reset
    monkeypatch.setattr(pool, "reset", lambda slot: zeroed.append(slot) or reset(slot))
    for s in range(6):  # the last two grew the pool
        assert pool.allocate() == s
        _fill(pool, s, float(s + 1))
    assert zeroed == []
    pool.free(2)
    pool.free(5)
    assert (pool.allocate(), pool.allocate()) == (5, 2)  # the freed ones first, each zeroed
    assert zeroed == [5, 2] and _value(pool, 5) == _value(pool, 2) == 0.0
    assert pool.allocate() == 6 and zeroed == [5, 2]  # then untouched slots again
    _fill(pool, 5, 9.0)
    for s in (0, 1, 6):
        pool.free(s)
    assert pool.compact(movable=[5]) == {5: 0}  # in use: 2, 3 and 4 pinned, 5 moved
    assert pool.capacity == 5 and _value(pool, 0) == 9.0
    assert pool.allocate() == 1 and zeroed[2:] == [1] and _value(pool, 1) == 0.0
    assert pool.allocate() == 5 and zeroed[2:] == [1]  # grown again: zeros, not zeroed
    assert _value(pool, 5) == 0.0


def test_reset_zeroes_one_slot_in_place() -> None:
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=2)
    a, b = pool.allocate(), pool.allocate()
    _fill(pool, a, 5.0)
    _fill(pool, b, 6.0)
    pool.reset(a)
    snap = pool.snapshot(a)
    assert snap.c is not None
    assert not snap.h.any() and not snap.c.any()
    np.testing.assert_array_equal(_out(pool, a), _initial(LSTM).numpy())
    assert _value(pool, b) == 6.0


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_snapshot_restore_round_trip_is_bit_exact(cell: str, reset_after: bool) -> None:
    config = token_config(cell, reset_after)
    rng = np.random.default_rng(3)
    pool = _pool(config, ByteBudget(1 << 20), slots=4)
    for _ in range(4):
        pool.allocate()
    original = random_snapshot(config, rng)
    original.h[0, 0] = -0.0  # a sign bit that == would not see
    original.h[1, 1] = np.float32(1e-40)  # a subnormal
    pool.restore(2, original)
    snap = pool.snapshot(2)
    _assert_same_bits(snap, original)
    np.testing.assert_array_equal(_out(pool, 2), _expected_last(config, original.h))
    assert snap.h.dtype == np.float32 and snap.h.shape == (2, 16)
    # Into another slot of another pool: the same bits again.
    other = _pool(config, ByteBudget(1 << 20), slots=1)
    other.restore(other.allocate(), snap)
    _assert_same_bits(other.snapshot(0), original)
    # Only slot 2 was written.
    for s in (0, 1, 3):
        assert not pool.snapshot(s).h.any()


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_snapshots_of_many_slots_are_each_slot_s_snapshot(cell: str, reset_after: bool) -> None:
    config = token_config(cell, reset_after)
    rng = np.random.default_rng(4)
    pool = _pool(config, ByteBudget(1 << 20), slots=5)
    for _ in range(5):
        pool.restore(pool.allocate(), random_snapshot(config, rng))
    slots = [3, 0, 4]  # any order
    many = pool.snapshots(slots)
    for slot, snap in zip(slots, many, strict=True):
        one = pool.snapshot(slot)
        _assert_same_bits(snap, one)
    many[0].h[:] = 5.0  # each its own copy: neither the others nor the pool change
    _assert_same_bits(many[1], pool.snapshot(0))
    _assert_same_bits(pool.snapshot(3), pool.snapshots([3, 0])[0])
    assert not (pool.snapshot(3).h == 5.0).all()


def test_a_snapshot_is_a_copy() -> None:
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=1)
    slot = pool.allocate()
    _fill(pool, slot, 1.5)
    snap = pool.snapshot(slot)
    _fill(pool, slot, -7.0)
    assert snap.c is not None
    assert (snap.h == 1.5).all() and (snap.c == -1.5).all()
    snap.h[:] = 9.0  # and writing the snapshot does not reach the pool
    assert _value(pool, slot) == -7.0


def test_an_lstm_slot_cannot_be_restored_without_its_cell_state() -> None:
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=1)
    slot = pool.allocate()
    snap = random_snapshot(LSTM, np.random.default_rng(0))
    with pytest.raises(AssertionError, match="cell state"):
        pool.restore(slot, SlotSnapshot(h=snap.h, c=None))


def test_gather_and_scatter_go_by_slot_index_in_the_order_given() -> None:
    pool = _pool(LSTM, ByteBudget(1 << 20), slots=5)
    for s in range(5):
        pool.allocate()
        _fill(pool, s, float(s))
    slots = torch.tensor([3, 0, 4])
    state = pool.gather(slots)
    assert state.c is not None
    assert state.h[:, :, 0].tolist() == [[3.0, 0.0, 4.0]] * 2
    assert state.c[:, :, 0].tolist() == [[-3.0, -0.0, -4.0]] * 2
    last = pool.outputs(state.h[-1])  # [3, out]: the head over the gathered top layer
    assert (last - _initial(LSTM))[:, 0].tolist() == [6.0, 0.0, 8.0]
    state.h.add_(100.0)  # the gathered rows are copies
    assert _value(pool, 3) == 3.0
    # Scatter the rows back shifted by one position: slot 3 gets what came from 0, and so on.
    perm = torch.tensor([1, 2, 0])
    pool.scatter(slots, RecurrentState(state.h[:, perm] - 100.0, state.c[:, perm]))
    assert [_value(pool, s) for s in range(5)] == [4.0, 1.0, 2.0, 0.0, 3.0]


# ---- compact and close ------------------------------------------------------------------------


@pytest.mark.parametrize("config", [LSTM, GRU], ids=["lstm", "gru"])
def test_compact_moves_movable_slots_into_holes_and_releases_the_tail(config: ModelConfig) -> None:
    slot_bytes = LSTM_SLOT_BYTES if config.has_cell_state else GRU_SLOT_BYTES
    budget = ByteBudget(8 * slot_bytes)
    pool = _pool(config, budget, slots=8)
    for s in range(8):
        assert pool.allocate() == s
        _fill(pool, s, float(s + 1))
    for s in (1, 2, 4, 5, 6):
        pool.free(s)
    # In use: 0, 3 (pinned) and 7 (movable). Three in use, pinned 3 → the pool keeps 4 slots.
    moves = pool.compact(movable=[7])
    assert moves == {7: 1}
    assert pool.capacity == 4 and pool.nbytes == 4 * slot_bytes
    assert budget.used_bytes == 4 * slot_bytes  # the tail went back to the budget
    assert tuple(pool.h.shape) == (2, 4, 16)
    assert pool.c is None or tuple(pool.c.shape) == (2, 4, 16)
    assert [_value(pool, s) for s in (0, 1, 3)] == [1.0, 8.0, 4.0]
    assert pool.used_slots == 3
    assert pool.allocate() == 2  # the hole left over, without growing
    assert pool.capacity == 4
    assert pool.allocate() == 4 and pool.capacity == 8  # then growing: 8 more cut to the 4 left


def test_compact_with_nothing_to_give_back_changes_nothing() -> None:
    budget = ByteBudget(1 << 20)
    pool = _pool(LSTM, budget, slots=4)
    for s in range(4):
        pool.allocate()
        _fill(pool, s, float(s))
    before = budget.used_bytes
    assert pool.compact(movable=range(4)) == {}  # every slot in use
    pool.free(1)
    assert pool.compact(movable=[]) == {}  # slot 3 is pinned at the top
    assert pool.capacity == 4 and budget.used_bytes == before
    assert [_value(pool, s) for s in (0, 2, 3)] == [0.0, 2.0, 3.0]
    assert pool.allocate() == 1


def test_compact_drops_a_free_tail_without_moving_anything() -> None:
    budget = ByteBudget(1 << 20)
    pool = _pool(LSTM, budget, slots=8)
    for s in range(3):
        pool.allocate()
        _fill(pool, s, float(s + 1))
    assert pool.compact(movable=[0, 1, 2]) == {}  # 0..2 already fill the bottom
    assert pool.capacity == 3 and budget.used_bytes == 3 * LSTM_SLOT_BYTES
    assert [_value(pool, s) for s in range(3)] == [1.0, 2.0, 3.0]


def test_close_gives_every_byte_back() -> None:
    budget = ByteBudget(1 << 20)
    budget.try_reserve(1000)  # someone else's bytes
    pool = _pool(LSTM, budget, slots=4)
    pool.allocate()
    pool.allocate()  # grows nothing: 4 slots were reserved up front
    assert budget.used_bytes == 1000 + 4 * LSTM_SLOT_BYTES
    pool.close()
    assert budget.used_bytes == 1000
    assert pool.capacity == 0 and pool.used_slots == 0 and pool.nbytes == 0
    assert tuple(pool.h.shape) == (2, 0, 16)  # its memory is let go, not kept to the end


def test_floor_stops_at_the_highest_slot_that_must_stay_put() -> None:
    """The pool can shrink no lower than its highest in-use slot outside `movable`, which is
    what makes evicting a session below a busy one pointless."""
    budget = ByteBudget(4 * LSTM_SLOT_BYTES)
    pool = _pool(LSTM, budget, 4)
    for _ in range(4):
        pool.allocate()
    assert pool.floor(movable=[0, 1, 2]) == 4  # slot 3 is busy: freeing the rest gains nothing
    assert pool.floor(movable=[1, 2, 3]) == 1
    assert pool.compact(movable=[1, 2, 3]) == {} and pool.capacity == 4  # none free yet
    pool.free(2)
    pool.compact(movable=[1, 3])
    assert pool.capacity == 3 and budget.used_bytes == 3 * LSTM_SLOT_BYTES

"""replay_rows against the NumPy reference: rows with earlier inputs only, a last request only
(with per-position predictions), both, or neither, in one batch, for every cell; the pool is
not touched."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from service.runtime.chunk_replay import ReplayRow, replay_rows
from service.runtime.step_batch import Row, StepBatch

from .conftest import (
    ATOL,
    CELL_IDS,
    CELLS,
    VOCAB,
    make_runner,
    random_snapshot,
    reference_run,
    softmax,
    token_config,
)


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_rows_end_where_the_reference_does(cell: str, reset_after: bool) -> None:
    config = token_config(cell, reset_after)
    model, pool, runner = make_runner(config, slots=2)
    rng = np.random.default_rng(3)
    inputs = [  # (earlier, last)
        (rng.integers(0, VOCAB, 5), None),
        (None, rng.integers(0, VOCAB, 3)),
        (rng.integers(0, VOCAB, 2), rng.integers(0, VOCAB, 4)),
        (None, None),
    ]
    bases = [random_snapshot(config, rng) for _ in inputs]
    rows = [
        ReplayRow(base, [] if earlier is None else [earlier], last, top_k=3, per_position=k == 2)
        for k, (base, (earlier, last)) in enumerate(zip(bases, inputs, strict=True))
    ]
    pool_before = pool.h.clone()
    got = replay_rows(runner, rows)
    assert (pool.h == pool_before).all()
    for (state, result), row, (earlier, last) in zip(got, rows, inputs, strict=True):
        base = row.base
        fed = [x for x in (earlier, last) if x is not None]
        if not fed:
            np.testing.assert_array_equal(state.h, base.h)
            np.testing.assert_array_equal(state.c, base.c)  # type: ignore[arg-type]
            assert result is None
            continue
        out, h, c = reference_run(model, base, np.concatenate(fed))
        np.testing.assert_allclose(state.h, h, rtol=0, atol=ATOL)
        if c is not None:
            np.testing.assert_allclose(state.c, c, rtol=0, atol=ATOL)
        if last is None:
            assert result is None
            continue
        assert result is not None and result.prediction is not None
        assert result.consumed == len(last)
        want = np.argsort(-softmax(out[-1]))[:3]
        assert list(result.prediction.top_ids) == list(want)
        if not row.per_position:
            assert not result.per_position
        else:
            assert len(result.per_position) == len(last)
            for k, prediction in enumerate(result.per_position):
                at = (0 if earlier is None else len(earlier)) + k
                assert list(prediction.top_ids) == list(np.argsort(-softmax(out[at]))[:3])


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's intra-op threads for the test (the server's default is one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_rows_end_bit_for_bit_where_their_live_steps_alone_did(
    cell: str, reset_after: bool, torch_threads: int
) -> None:
    """Journaled steps of one input and of many, each run live alone (the runner's fused
    one-row step for one input, the whole-chunk kernel for more): replayed, two rows in one
    call, each ends with the live state and last reply, bit for bit. (Before, one whole-chunk
    call over every step differed in the last bits; with one thread, so did one over two
    consecutive many-input steps.)"""
    config = token_config(cell, reset_after)
    _, pool, runner = make_runner(config, slots=2)
    rng = np.random.default_rng(5)
    histories = [
        [rng.integers(0, VOCAB, n) for n in (1, 3, 1, 1, 4, 2, 1)],
        [rng.integers(0, VOCAB, n) for n in (2, 5, 3, 2)],
    ]
    rows, want = [], []
    for k, steps in enumerate(histories):
        base = random_snapshot(config, rng)
        slot = pool.allocate()
        pool.restore(slot, base)
        for inputs in steps:
            row = Row(slot=slot, inputs=torch.from_numpy(inputs), top_k=3, per_position=k == 0)
            live = runner.execute(StepBatch([row])).results[0]
        want.append((pool.snapshot(slot), live))
        rows.append(ReplayRow(base, steps[:-1], steps[-1], top_k=3, per_position=k == 0))
    got = replay_rows(runner, rows)
    for (state, result), (snap, live), steps in zip(got, want, histories, strict=True):
        np.testing.assert_array_equal(state.h, snap.h)
        if snap.c is not None:
            np.testing.assert_array_equal(state.c, snap.c)  # type: ignore[arg-type]
        assert result is not None and live.prediction is not None
        assert result.consumed == len(steps[-1])
        assert result.prediction == live.prediction
        assert list(result.per_position) == list(live.per_position)

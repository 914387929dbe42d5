"""replay_rows against the NumPy reference: rows with earlier inputs only, a last request only
(with per-position predictions), both, or neither, in one batch, for every cell; the pool is
not touched."""

from __future__ import annotations

import numpy as np
import pytest

from service.runtime.chunk_replay import ReplayRow, replay_rows

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
        ReplayRow(base, earlier, last, top_k=3, per_position=k == 2)
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

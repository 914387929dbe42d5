"""Replaying recorded inputs on states outside the pool (journal replay after a restart).

Each row starts from a base state (a checkpoint, or a new session's), consumes its earlier
inputs in one whole-chunk call over every row that has some, then its last request's inputs in
a second call that also returns the predictions that request's reply carried. The pool is not
touched: serving goes on beside a replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.models import RecurrentState
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import SlotSnapshot
from service.runtime.step_batch import RowResult


@dataclass
class ReplayRow:
    base: SlotSnapshot
    earlier: np.ndarray | None  # [T] int tokens or [T, D] float32 frames; None: nothing
    last: np.ndarray | None  # the last request's inputs, when it was a feed
    top_k: int = 0  # the last request's prediction options
    per_position: bool = False


@torch.inference_mode()
def replay_rows(
    runner: ModelRunner, rows: list[ReplayRow]
) -> list[tuple[SlotSnapshot, RowResult | None]]:
    """Each row's state after all its inputs, and its last request's result (None without)."""
    if not rows:
        return []
    state = RecurrentState(
        torch.from_numpy(np.stack([r.base.h for r in rows], axis=1)),  # [L, B, H]
        torch.from_numpy(np.stack([r.base.c for r in rows], axis=1))  # type: ignore[misc]
        if rows[0].base.c is not None
        else None,
    )
    earlier = [j for j, r in enumerate(rows) if r.earlier is not None]
    state, _ = _run(runner, state, earlier, [rows[j].earlier for j in earlier])
    fed = [j for j, r in enumerate(rows) if r.last is not None]
    options = [(rows[j].top_k, rows[j].per_position) for j in fed]
    state, results = _run(runner, state, fed, [rows[j].last for j in fed], options)
    by_row: dict[int, RowResult] = dict(zip(fed, results, strict=True))
    return [
        (
            SlotSnapshot(
                h=state.h[:, j].numpy().copy(),
                c=None if state.c is None else state.c[:, j].numpy().copy(),
            ),
            by_row.get(j),
        )
        for j in range(len(rows))
    ]


def _run(
    runner: ModelRunner,
    state: RecurrentState,
    rows: list[int],
    inputs: list[np.ndarray | None],
    options: list[tuple[int, bool]] | None = None,
) -> tuple[RecurrentState, list[RowResult]]:
    """Feed `inputs` to `rows` of the batch in one whole-chunk call; with `options` (top_k,
    per_position per row) also the predictions a reply carries."""
    if not rows:
        return state, []
    index = torch.tensor(rows, dtype=torch.int64)
    seqs = [torch.from_numpy(x) for x in inputs if x is not None]
    lengths = torch.tensor([x.shape[0] for x in seqs], dtype=torch.int64)
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    sub = RecurrentState(
        state.h.index_select(1, index),
        None if state.c is None else state.c.index_select(1, index),
    )
    every = options is not None and any(per_position for _, per_position in options)
    out, new = runner.model.run_chunk(padded, sub, lengths, all_positions=every)
    tail = out[torch.arange(len(rows)), lengths - 1] if every else out  # [R, out]
    h = state.h.index_copy(1, index, new.h)
    c = None
    if state.c is not None:
        assert new.c is not None, "an LSTM's chunk returns its cell state"
        c = state.c.index_copy(1, index, new.c)
    results: list[RowResult] = []
    if options is not None:
        predictions = runner.predictions(tail, [k for k, _ in options], range(len(rows)))
        for j, (prediction, (top_k, per_position)) in enumerate(
            zip(predictions, options, strict=True)
        ):
            n = int(lengths[j])
            result = RowResult(consumed=n, prediction=prediction)
            if per_position:
                result.per_position = runner.predictions(out[j, :n], [top_k] * n, range(n))
            results.append(result)
    return RecurrentState(h, c), results

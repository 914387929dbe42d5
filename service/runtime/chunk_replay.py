"""Replaying recorded inputs on states outside the pool (journal replay after a restart).

Each row starts from a base state (a checkpoint, or a new session's), consumes its earlier
steps' inputs, then its last request's, which also return the predictions that request's reply
carried. Each journaled step runs alone and through the kernel its live step ran, so the state
and the reply are bit for bit those of a live step that ran alone: a one-input step through the
fused `step` (the runner's one-row step), a many-input step through one whole-chunk call. Not
one call over a row's steps together, nor over many rows: a whole-chunk call over more inputs,
or more rows, can sum in another order (seen with one torch thread, the default). The journal
does not say whether a live step ran batched with other sessions' rows; one that did can differ
from this replay in the last bits (README, "Exactly once"). The pool is not touched: serving
goes on beside a replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from service.models import RecurrentState
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import SlotSnapshot
from service.runtime.step_batch import RowResult


@dataclass
class ReplayRow:
    base: SlotSnapshot
    # Each earlier journaled step's inputs, in order: [T] int tokens or [T, D] float32 frames
    earlier: list[np.ndarray] = field(default_factory=list)
    last: np.ndarray | None = None  # the last request's inputs, when it was a feed
    top_k: int = 0  # the last request's prediction options
    per_position: bool = False


@torch.inference_mode()
def replay_rows(
    runner: ModelRunner, rows: list[ReplayRow]
) -> list[tuple[SlotSnapshot, RowResult | None]]:
    """Each row's state after all its inputs, and its last request's result (None without)."""
    return [_replay(runner, row) for row in rows]


def _replay(runner: ModelRunner, row: ReplayRow) -> tuple[SlotSnapshot, RowResult | None]:
    state = RecurrentState(
        torch.from_numpy(row.base.h[:, None].copy()),  # [L, 1, H]
        None if row.base.c is None else torch.from_numpy(row.base.c[:, None].copy()),
    )
    for inputs in row.earlier:
        if inputs.shape[0] > 1:
            state, _ = _run(runner, state, [0], [inputs])
        else:
            _, state = runner.model.step(torch.from_numpy(inputs), state)
    result: RowResult | None = None
    if row.last is not None and row.last.shape[0] > 1:
        state, (result,) = _run(runner, state, [0], [row.last], [(row.top_k, row.per_position)])
    elif row.last is not None:
        out, state = runner.model.step(torch.from_numpy(row.last), state)
        (prediction,) = runner.predictions(out, [row.top_k], [0])
        result = RowResult(consumed=1, prediction=prediction)
        if row.per_position:
            result.per_position = [prediction]
    snapshot = SlotSnapshot(
        h=state.h[:, 0].numpy().copy(),
        c=None if state.c is None else state.c[:, 0].numpy().copy(),
    )
    return snapshot, result


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

"""ModelRunner.execute over tiny seeded models, against the NumPy reference of the cells.

A batched step over several slots equals each row run alone; a chunk equals its tokens fed one
at a time; per-position predictions; generate rows sample from the slot's last output and
consume the token; top-k predictions are the reference softmax's; the regression path."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

from service.models import ModelConfig
from service.runtime.runner import ModelRunner
from service.runtime.sampler import SamplingParams, SessionRng, sample
from service.runtime.state_pool import SlotSnapshot, StatePool
from service.runtime.step_batch import Prediction, Row, RowResult, StepBatch, StepOutput

from .conftest import (
    ATOL,
    CELL_IDS,
    CELLS,
    FRAME,
    REG_OUT,
    VOCAB,
    head_output,
    make_config,
    make_runner,
    random_snapshot,
    reference_run,
    softmax,
    token_config,
)

BATCH_ATOL = 1e-6  # batched against alone: the same float32 arithmetic, up to summation order


def _setup(
    config: ModelConfig, slots: int = 8, seed: int = 0, state_seed: int = 1
) -> tuple[StatePool, ModelRunner, list[SlotSnapshot]]:
    """A runner whose pool has every slot allocated and holding a random state; the snapshots
    read back."""
    _, pool, runner = make_runner(config, seed=seed, slots=slots)
    rng = np.random.default_rng(state_seed)
    snaps = []
    for _ in range(slots):
        slot = pool.allocate()
        pool.restore(slot, random_snapshot(config, rng))
        snaps.append(pool.snapshot(slot))
    return pool, runner, snaps


def _tokens(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def _assert_state(pool: StatePool, slot: int, h: np.ndarray, c: np.ndarray | None, atol: float):
    snap = pool.snapshot(slot)
    np.testing.assert_allclose(snap.h, h, rtol=0, atol=atol)
    if c is None:
        assert snap.c is None
    else:
        assert snap.c is not None
        np.testing.assert_allclose(snap.c, c, rtol=0, atol=atol)


def _assert_prediction(pred: Prediction | None, logits: np.ndarray, k: int) -> None:
    """A token prediction is the reference softmax's k most likely ids, with their probabilities
    (to ATOL), sorted, distinct."""
    assert pred is not None
    probs = softmax(logits)
    ids, ps = list(pred.top_ids), list(pred.top_probs)
    assert len(ids) == len(ps) == k
    assert len(set(ids)) == k
    assert ps == sorted(ps, reverse=True)
    np.testing.assert_allclose(ps, probs[ids], rtol=0, atol=ATOL)
    rest = np.delete(probs, ids)
    # The k most likely (up to float noise between near-equal tokens).
    assert rest.size == 0 or float(probs[ids].min()) >= float(rest.max()) - ATOL
    assert sum(ps) <= 1.0 + 1e-6
    assert sum(ps) == pytest.approx(float(probs[ids].sum()), abs=ATOL)
    assert len(pred.values) == 0


def _assert_same_prediction(a: Prediction | None, b: Prediction | None, atol: float) -> None:
    assert a is not None and b is not None
    assert a.top_ids == b.top_ids
    np.testing.assert_allclose(a.top_probs, b.top_probs, rtol=0, atol=atol)
    np.testing.assert_allclose(a.values, b.values, rtol=0, atol=atol)


# ---- single-input rows ------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_a_batched_step_equals_each_row_alone_and_the_reference(
    cell: str, reset_after: bool
) -> None:
    config = token_config(cell, reset_after)
    pool, runner, snaps = _setup(config)
    slots, toks = [5, 2, 7, 0], [3, 39, 0, 17]
    rows = [Row(slot=s, inputs=_tokens(t), top_k=4) for s, t in zip(slots, toks, strict=True)]
    out = runner.execute(StepBatch(rows))
    assert len(out.results) == 4
    for s, t, res in zip(slots, toks, out.results, strict=True):
        assert res.consumed == 1 and res.token is None and not res.per_position
        # Alone, in a fresh pool of the same model from the same state.
        alone_pool, alone_runner, _ = _setup(config)
        alone = alone_runner.execute(StepBatch([Row(slot=s, inputs=_tokens(t), top_k=4)]))
        _assert_same_prediction(res.prediction, alone.results[0].prediction, BATCH_ATOL)
        after = alone_pool.snapshot(s)
        _assert_state(pool, s, after.h, after.c, BATCH_ATOL)
        # And the reference from the same state.
        logits, h, c = reference_run(runner.model, snaps[s], np.array([t]))
        _assert_prediction(res.prediction, logits[-1], 4)
        _assert_state(pool, s, h, c, ATOL)
        np.testing.assert_allclose(head_output(pool, s), logits[-1], rtol=0, atol=ATOL)
    # Slots outside the batch are not touched at all.
    for s in (1, 3, 4, 6):
        snap = pool.snapshot(s)
        np.testing.assert_array_equal(snap.h, snaps[s].h)
        np.testing.assert_array_equal(snap.c, snaps[s].c)  # type: ignore[arg-type]


def test_a_step_reports_the_cpu_time_it_took_on_its_own_thread() -> None:
    """Thread CPU time, not wall time: a step that waits (here, for another thread holding
    the pool's lock) is not charged for the wait."""
    pool, runner, _ = _setup(token_config("lstm", False))
    rows = [Row(slot=s, inputs=_tokens(3), top_k=4) for s in range(4)]
    runner.execute(StepBatch(rows))  # warm
    out = runner.execute(StepBatch(rows))
    assert out.timings.cpu_seconds > 0
    waited: list[StepOutput] = []
    with pool.lock:  # held by another thread while the step waits for it
        waiting = threading.Thread(target=lambda: waited.append(runner.execute(StepBatch(rows))))
        waiting.start()
        time.sleep(0.3)
    waiting.join()
    assert waited[0].timings.cpu_seconds < 0.2  # the 0.3 s spent waiting is not CPU


@pytest.mark.parametrize(
    ("top_k", "expected"), [(0, 1), (1, 1), (5, 5), (VOCAB, VOCAB), (99, VOCAB)]
)
def test_top_k_predictions_are_the_reference_softmax(top_k: int, expected: int) -> None:
    config = token_config("lstm")
    _, runner, snaps = _setup(config, slots=3)
    # Rows asking for different k in one batch: each gets its own.
    rows = [
        Row(slot=0, inputs=_tokens(11), top_k=top_k),
        Row(slot=1, inputs=_tokens(12), top_k=3),
        Row(slot=2, inputs=_tokens(13, 14), top_k=top_k),
    ]
    out = runner.execute(StepBatch(rows))
    asked = [(0, [11], expected), (1, [12], 3), (2, [13, 14], expected)]
    for res, (slot, toks, k) in zip(out.results, asked, strict=True):
        logits, _, _ = reference_run(runner.model, snaps[slot], np.array(toks))
        _assert_prediction(res.prediction, logits[-1], k)
    if expected == VOCAB:  # the whole distribution: it sums to one
        full = out.results[0].prediction
        assert full is not None
        assert sum(full.top_probs) == pytest.approx(1.0, abs=1e-5)
        assert sorted(full.top_ids) == list(range(VOCAB))


def test_predictions_are_numbers_the_collector_stops_tracking() -> None:
    """An idle session keeps its last prediction (for a retry): its fields are tuples of
    numbers, which the cycle collector untracks at their first collection, so holding many
    sessions does not grow what every collection (and the heap's thaw) walks. Lists would be
    tracked for as long as the session lives."""
    _, runner, _ = _setup(token_config("lstm"), slots=2)
    out = runner.execute(StepBatch([Row(slot=0, inputs=_tokens(11), top_k=3)]))
    pred = out.results[0].prediction
    assert pred is not None
    gc.collect()
    for field in (pred.top_ids, pred.top_probs, pred.values):
        assert isinstance(field, tuple) and not gc.is_tracked(field)
    _, regression, _ = _setup(make_config("lstm", False, 2, "tokens", "regression"), slots=1)
    values = regression.execute(StepBatch([Row(slot=0, inputs=_tokens(3))])).results[0]
    assert values.prediction is not None
    gc.collect()
    assert isinstance(values.prediction.values, tuple)
    assert not gc.is_tracked(values.prediction.values)


# ---- chunks (multi-input rows) ----------------------------------------------------------------


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("lengths", [(6, 3), (4, 4)], ids=["ragged", "equal"])
def test_a_chunk_equals_its_tokens_fed_one_at_a_time(
    cell: str, reset_after: bool, lengths: tuple[int, int]
) -> None:
    config = token_config(cell, reset_after)
    pool, runner, snaps = _setup(config, slots=4)
    rng = np.random.default_rng(7)
    chunks = {3: rng.integers(0, VOCAB, size=lengths[0]).tolist()}
    chunks[1] = rng.integers(0, VOCAB, size=lengths[1]).tolist()
    # Chunks and a single-token row interleaved: results come back in batch order.
    rows = [
        Row(slot=3, inputs=_tokens(*chunks[3]), top_k=5),
        Row(slot=0, inputs=_tokens(9), top_k=5),
        Row(slot=1, inputs=_tokens(*chunks[1]), top_k=5),
    ]
    out = runner.execute(StepBatch(rows))
    assert [r.consumed for r in out.results] == [lengths[0], 1, lengths[1]]

    step_pool, step_runner, _ = _setup(config, slots=4)
    for j, slot in ((0, 3), (2, 1)):
        for t in chunks[slot]:
            last = step_runner.execute(StepBatch([Row(slot=slot, inputs=_tokens(t), top_k=5)]))
        one_by_one = step_pool.snapshot(slot)
        _assert_state(pool, slot, one_by_one.h, one_by_one.c, ATOL)
        np.testing.assert_allclose(
            head_output(pool, slot), head_output(step_pool, slot), rtol=0, atol=ATOL
        )
        _assert_same_prediction(out.results[j].prediction, last.results[0].prediction, ATOL)
        logits, h, c = reference_run(runner.model, snaps[slot], np.array(chunks[slot]))
        _assert_prediction(out.results[j].prediction, logits[-1], 5)
        _assert_state(pool, slot, h, c, ATOL)
    logits, h, c = reference_run(runner.model, snaps[0], np.array([9]))
    _assert_prediction(out.results[1].prediction, logits[-1], 5)
    _assert_state(pool, 0, h, c, ATOL)


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_per_position_predictions_follow_the_reference_at_every_position(
    cell: str, reset_after: bool
) -> None:
    config = token_config(cell, reset_after)
    pool, runner, snaps = _setup(config, slots=4)
    chunk, other = [4, 8, 15, 16, 23], [2, 1, 2]
    rows = [
        Row(slot=2, inputs=_tokens(*chunk), top_k=3, per_position=True),
        Row(slot=0, inputs=_tokens(*other), top_k=2),  # same batch, not asking
        Row(slot=1, inputs=_tokens(7), top_k=2, per_position=True),  # a single input
        Row(slot=3, inputs=_tokens(5), top_k=2),
    ]
    out = runner.execute(StepBatch(rows))
    a, b, single, plain = out.results
    logits, h, c = reference_run(runner.model, snaps[2], np.array(chunk))
    assert len(a.per_position) == len(chunk)
    for t, pred in enumerate(a.per_position):
        _assert_prediction(pred, logits[t], 3)
    _assert_same_prediction(a.prediction, a.per_position[-1], 0.0)
    _assert_state(pool, 2, h, c, ATOL)  # the state is after the last input, not the padding
    np.testing.assert_allclose(head_output(pool, 2), logits[-1], rtol=0, atol=ATOL)

    assert not b.per_position
    logits_b, _, _ = reference_run(runner.model, snaps[0], np.array(other))
    _assert_prediction(b.prediction, logits_b[-1], 2)

    assert len(single.per_position) == 1
    _assert_same_prediction(single.per_position[0], single.prediction, 0.0)
    logits_s, _, _ = reference_run(runner.model, snaps[1], np.array([7]))
    _assert_prediction(single.prediction, logits_s[-1], 2)
    assert not plain.per_position


# ---- generate rows ----------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_generate_rows_sample_from_the_last_output_and_consume_the_token(
    cell: str, reset_after: bool
) -> None:
    config = token_config(cell, reset_after)
    pool, runner, snaps = _setup(config, slots=4)
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=1.5, top_k=10)
    rows = [
        Row(slot=1, inputs=None, sampling=greedy, rng=SessionRng.seeded(0)),
        Row(slot=3, inputs=_tokens(21), top_k=3),
        Row(slot=0, inputs=None, sampling=hot, rng=SessionRng.seeded(5)),
    ]
    before = {s: head_output(pool, s) for s in (0, 1)}  # what each slot predicts before
    out = runner.execute(StepBatch(rows))
    g, feed, h_row = out.results

    # Greedy: the argmax of the slot's output before the step.
    assert g.token == int(np.argmax(before[1]))
    # Sampled: what the sampler draws from that output with the same seed.
    expected = sample(torch.from_numpy(before[0])[None], [hot], [SessionRng.seeded(5)])
    assert h_row.token == int(expected[0])
    for res, slot in ((g, 1), (h_row, 0)):
        assert res.consumed == 1 and res.prediction is None and not res.per_position
        assert res.token is not None
        logits, h, c = reference_run(runner.model, snaps[slot], np.array([res.token]))
        _assert_state(pool, slot, h, c, ATOL)  # the token was fed
        np.testing.assert_allclose(head_output(pool, slot), logits[-1], rtol=0, atol=ATOL)

    assert feed.token is None and feed.consumed == 1
    logits, h, c = reference_run(runner.model, snaps[3], np.array([21]))
    _assert_prediction(feed.prediction, logits[-1], 3)
    _assert_state(pool, 3, h, c, ATOL)


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_greedy_generation_from_a_fresh_slot_is_the_reference_greedy_decode(
    cell: str, reset_after: bool
) -> None:
    """Only generate rows in the batch, step after step: each token is the argmax of the
    reference after the tokens before it, starting from the initial output of a zero state."""
    config = token_config(cell, reset_after)
    _, pool, runner = make_runner(config, seed=4, slots=2)
    a, b = pool.allocate(), pool.allocate()
    params = SamplingParams(temperature=0.0)
    zero = SlotSnapshot(
        h=np.zeros((2, 16), np.float32),
        c=np.zeros((2, 16), np.float32) if config.has_cell_state else None,
    )
    got: list[int] = []
    for _ in range(6):
        batch = StepBatch(
            [
                Row(slot=a, inputs=None, sampling=params, rng=SessionRng.seeded(1)),
                Row(slot=b, inputs=None, sampling=params, rng=SessionRng.seeded(2)),
            ]
        )
        ra, rb = runner.execute(batch).results
        assert ra.token == rb.token  # the same state gives the same greedy token
        assert ra.token is not None
        got.append(ra.token)
    # Reference greedy decode from the zero state: the first logits are the head over h = 0.
    logits = runner.model.head.bias.detach().double().numpy()
    expected: list[int] = []
    for _ in range(6):
        expected.append(int(np.argmax(logits)))
        logits = reference_run(runner.model, zero, np.array(expected))[0][-1]
    assert got == expected


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_a_generation_samples_from_the_head_output_its_last_step_kept(
    cell: str, reset_after: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that carry their last step's head output (`Row.head`) draw the same tokens as rows
    whose output is computed again from the state, and the head runs only for rows without
    one: the first step, a row that joins, a row whose kept output is another step's."""
    config = token_config(cell, reset_after)
    twins = _GenerationTwins(config, slots=4, seed=7, monkeypatch=monkeypatch)
    pool = twins.pools[0][0]
    # Slots per step: three generations; a fourth joins; then the order changes.
    for step, slots in enumerate([[0, 1, 2], [0, 1, 2], [0, 1, 2, 3], [3, 2, 1, 0], [1, 3]]):
        tokens, results = twins.step(slots)
        assert tokens[0] == tokens[1], f"step {step}"
        for s, res in zip(slots, results, strict=True):
            assert res.head is not None
            kept_out, row = res.head
            # What it keeps is the head over the state the step left.
            again = twins.outputs(pool.h[-1, s : s + 1])[0]
            torch.testing.assert_close(kept_out[row], again, rtol=0, atol=BATCH_ATOL)
    # The first step computes all three; the fourth slot's first row is computed alone; the
    # reordered and the shorter steps take every output from the step before.
    assert twins.computed == [3, 1]


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_rows_carrying_outputs_of_different_steps_take_one_and_compute_the_others(
    cell: str, reset_after: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a step's generate rows carry outputs kept by different steps, the runner takes the
    rows of one of them and runs the head for the rest; the tokens are those of rows computed
    from the state."""
    twins = _GenerationTwins(token_config(cell, reset_after), 3, 5, monkeypatch)
    # Slots 0 and 1 step together, then slot 2 alone, then all three: two kept outputs.
    for step, slots in enumerate([[0, 1], [2], [0, 2, 1]]):
        tokens, _ = twins.step(slots)
        assert tokens[0] == tokens[1], f"step {step}"
    # The last step takes slots 0 and 1 from the first step's output and computes slot 2's.
    assert twins.computed == [2, 1, 1]


class _GenerationTwins:
    """Two runners on equal pools and equal seeded streams, stepping the same generate rows:
    the first's rows carry the head output their last step kept (`Row.head`), the second's are
    computed from the state. `computed`: the rows the first runner's head ran over, per call."""

    def __init__(
        self, config: ModelConfig, slots: int, seed: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.pools = [_setup(config, slots=slots, state_seed=seed) for _ in range(2)]
        self.rngs = [[SessionRng.seeded(10 * seed + s) for s in range(slots)] for _ in range(2)]
        self.kept: dict[int, tuple[torch.Tensor, int] | None] = dict.fromkeys(range(slots))
        self.computed: list[int] = []
        carrying = self.pools[0][0]
        self.outputs = carrying.outputs
        monkeypatch.setattr(
            carrying, "outputs", lambda h: self.computed.append(h.shape[0]) or self.outputs(h)
        )

    def step(self, slots: list[int]) -> tuple[list[list[int | None]], list[RowResult]]:
        """→ each runner's tokens, and the carrying runner's results."""
        hot = SamplingParams(temperature=1.3)
        tokens, carried = [], []
        for carry, (_, runner, _) in enumerate(self.pools):
            rows = [
                Row(
                    slot=s,
                    inputs=None,
                    sampling=hot,
                    rng=self.rngs[carry][s],
                    head=self.kept[s] if carry == 0 else None,
                )
                for s in slots
            ]
            results = runner.execute(StepBatch(rows)).results
            tokens.append([r.token for r in results])
            if carry == 0:
                carried = results
                self.kept.update((s, r.head) for s, r in zip(slots, results, strict=True))
        return tokens, carried


# ---- the regression path ----------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("input_kind", ["features", "tokens"])
def test_regression_rows_return_the_head_values(
    cell: str, reset_after: bool, input_kind: str
) -> None:
    config = make_config(cell, reset_after, 2, input_kind, "regression")
    pool, runner, snaps = _setup(config, slots=3)
    rng = np.random.default_rng(11)
    if input_kind == "features":
        one = rng.normal(size=(1, FRAME)).astype(np.float32)
        chunk = rng.normal(size=(4, FRAME)).astype(np.float32)
        inputs = [torch.from_numpy(one), torch.from_numpy(chunk)]
        ref_inputs = [one, chunk]
    else:
        ref_inputs = [np.array([3]), np.array([1, 2, 3, 4])]
        inputs = [torch.from_numpy(x) for x in ref_inputs]
    rows = [
        Row(slot=2, inputs=inputs[0], top_k=5),  # top_k means nothing here
        Row(slot=0, inputs=inputs[1], per_position=True),
    ]
    out = runner.execute(StepBatch(rows))
    for res, slot, x in zip(out.results, (2, 0), ref_inputs, strict=True):
        outputs, h, c = reference_run(runner.model, snaps[slot], x)
        assert res.consumed == len(x)
        assert res.prediction is not None
        assert len(res.prediction.top_ids) == len(res.prediction.top_probs) == 0
        assert len(res.prediction.values) == REG_OUT
        np.testing.assert_allclose(res.prediction.values, outputs[-1], rtol=0, atol=ATOL)
        _assert_state(pool, slot, h, c, ATOL)
    per = out.results[1].per_position
    assert len(per) == 4
    np.testing.assert_allclose([p.values for p in per], outputs, rtol=0, atol=ATOL)

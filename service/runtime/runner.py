"""The model runner: executes one StepBatch against a version's model and state pool.

Per batch: gather state rows by slot, sample the generate rows from their last outputs (the head
over their top-layer h: the pool keeps no outputs), run one
fused recurrent step over every single-input row and one whole-chunk call over the multi-input
rows, scatter the new state back, and turn head outputs into predictions. Runs off the event
loop (torch releases the GIL); the pool lock keeps slot allocation out of the way.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from service.models import RecurrentState, SequenceModel
from service.runtime.sampler import sample
from service.runtime.state_pool import StatePool
from service.runtime.step_batch import (
    Prediction,
    Row,
    RowResult,
    StepBatch,
    StepOutput,
    StepTimings,
)


class ModelRunner:
    def __init__(self, model: SequenceModel, pool: StatePool) -> None:
        self.model = model
        self.pool = pool
        self.config = model.config
        self.device = pool.device

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepOutput:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        timings = StepTimings()
        rows = batch.rows
        results = [RowResult(consumed=0) for _ in rows]
        before: list[tuple[Tensor, RecurrentState]] = []
        single: list[int] = []
        multi: list[int] = []
        for i, r in enumerate(rows):  # shape[0], not len(): Tensor.__len__ is Python-level
            (single if r.inputs is None or r.inputs.shape[0] == 1 else multi).append(i)
        with self.pool.lock:
            if single:
                before.append(self._run_single(batch, single, results, timings))
            if multi:
                before.append(self._run_multi(batch, multi, results, timings))
        t1 = time.perf_counter()
        # Whatever the phases did not account for (locking, bookkeeping) is forward overhead.
        accounted = timings.gather_seconds + timings.scatter_seconds + timings.sample_seconds
        timings.forward_seconds = max(timings.forward_seconds, t1 - t0 - accounted)
        timings.cpu_seconds = time.thread_time() - cpu0
        return StepOutput(results, timings, before)

    def undo(self, output: StepOutput) -> None:
        """Put the rows of a finished step back as they were before it (a step that could not
        be made durable must not count). The rows' RNG draws are the caller's to rewind."""
        with self.pool.lock:
            for slots, state in output.before:
                self.pool.scatter(slots, state)

    def _slots(self, batch: StepBatch, idx: list[int]) -> Tensor:
        return self.pool.index([batch.rows[i].slot for i in idx])

    def _run_single(
        self, batch: StepBatch, idx: list[int], results: list[RowResult], timings: StepTimings
    ) -> tuple[Tensor, RecurrentState]:
        t0 = time.perf_counter()
        slots = self._slots(batch, idx)
        state = self.pool.gather(slots)  # h/c [L, B, H]
        t1 = time.perf_counter()
        gen = [j for j, i in enumerate(idx) if batch.rows[i].inputs is None]
        sampled: Tensor | None = None
        if gen:
            params = [batch.rows[idx[j]].sampling for j in gen]
            rngs = [batch.rows[idx[j]].rng for j in gen]
            assert all(p is not None for p in params) and all(r is not None for r in rngs)
            last = self._generation_heads([batch.rows[idx[j]] for j in gen], gen, state)
            sampled = sample(last, params, rngs)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        inputs = self._stack_single_inputs(batch, idx, gen, sampled)  # [B] or [B, D]
        out, new_state = self.model.step(inputs, state)  # out [B, out]
        t3 = time.perf_counter()
        self.pool.scatter(slots, new_state)
        t4 = time.perf_counter()
        gen_set = set(gen)
        feed = [j for j in range(len(idx)) if j not in gen_set]
        preds = self.predictions(out, [batch.rows[idx[j]].top_k for j in feed], feed)
        for j, pred in zip(feed, preds, strict=True):
            res = results[idx[j]]
            res.consumed, res.prediction = 1, pred
            if batch.rows[idx[j]].per_position:
                res.per_position = [pred]
        if sampled is not None:
            for j, token in zip(gen, sampled.tolist(), strict=True):
                res = results[idx[j]]
                res.consumed, res.token, res.head = 1, int(token), (out, j)
        t5 = time.perf_counter()
        timings.gather_seconds += t1 - t0
        timings.sample_seconds += (t2 - t1) + (t5 - t4)
        timings.forward_seconds += t3 - t2
        timings.scatter_seconds += t4 - t3
        return slots, state

    def _generation_heads(self, rows: list[Row], gen: list[int], state: RecurrentState) -> Tensor:
        """The head output after each generate row's last input [G, out]: what the step that
        made it kept (`Row.head`), computed from the state (rows `gen` of it) only for the rows
        without, such as a generation's first."""
        kept = next((r.head[0] for r in rows if r.head is not None), None)
        have = [j for j, r in enumerate(rows) if r.head is not None and r.head[0] is kept]
        if kept is None:
            h_top = state.h[-1]  # [B, H]
            return self.pool.outputs(h_top if len(gen) == h_top.shape[0] else h_top[gen])
        at = [rows[j].head[1] for j in have]  # type: ignore[index]
        if len(have) == len(rows):
            if at == list(range(len(rows))):  # the same rows in the same order: most steps
                return kept[: len(rows)]
            return kept.index_select(0, torch.tensor(at, device=kept.device))
        heads = torch.empty((len(rows), kept.shape[1]), dtype=kept.dtype, device=kept.device)
        heads[have] = kept.index_select(0, torch.tensor(at, device=kept.device))
        kept_rows = set(have)
        missing = [j for j in range(len(rows)) if j not in kept_rows]
        heads[missing] = self.pool.outputs(state.h[-1][[gen[j] for j in missing]])
        return heads

    def _stack_single_inputs(
        self, batch: StepBatch, idx: list[int], gen: list[int], sampled: Tensor | None
    ) -> Tensor:
        """One concatenation of the feed rows' inputs (each [1] or [1, D]) and one scatter of the
        sampled tokens, not a tensor write per row: per-element indexing dominated big batches."""
        feeds = [batch.rows[i].inputs for i in idx if batch.rows[i].inputs is not None]
        if not gen:
            return torch.cat(feeds).to(self.device)  # type: ignore[arg-type]
        assert self.config.input_kind == "tokens", "generation needs a token model"
        assert sampled is not None
        sampled = sampled.to(device="cpu", dtype=torch.int64)
        if not feeds:
            return sampled.to(self.device)
        tokens = torch.empty(len(idx), dtype=torch.int64)
        tokens[torch.tensor(gen, dtype=torch.int64)] = sampled
        gen_set = set(gen)
        feed_pos = torch.tensor([j for j in range(len(idx)) if j not in gen_set], dtype=torch.int64)
        tokens[feed_pos] = torch.cat(feeds).to(device="cpu", dtype=torch.int64)  # type: ignore[arg-type]
        return tokens.to(self.device)

    def _run_multi(
        self, batch: StepBatch, idx: list[int], results: list[RowResult], timings: StepTimings
    ) -> tuple[Tensor, RecurrentState]:
        t0 = time.perf_counter()
        slots = self._slots(batch, idx)
        state = self.pool.gather(slots)
        seqs = [batch.rows[i].inputs for i in idx]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)  # type: ignore[arg-type]
        padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(self.device)  # type: ignore[arg-type]
        want_all = any(batch.rows[i].per_position for i in idx)
        t1 = time.perf_counter()
        out, new_state = self.model.run_chunk(padded, state, lengths, all_positions=want_all)
        if want_all:
            last_pos = (lengths - 1).to(self.device)
            last_out = out[torch.arange(len(idx), device=self.device), last_pos]  # [B, out]
        else:
            last_out = out  # [B, out]
        t2 = time.perf_counter()
        self.pool.scatter(slots, new_state)
        t3 = time.perf_counter()
        preds = self.predictions(last_out, [batch.rows[i].top_k for i in idx], range(len(idx)))
        for j, i in enumerate(idx):
            res = results[i]
            res.consumed, res.prediction = int(lengths[j]), preds[j]
            if batch.rows[i].per_position:
                n = int(lengths[j])
                res.per_position = self.predictions(out[j, :n], [batch.rows[i].top_k] * n, range(n))
        t4 = time.perf_counter()
        timings.gather_seconds += t1 - t0
        timings.forward_seconds += t2 - t1
        timings.scatter_seconds += t3 - t2
        timings.sample_seconds += t4 - t3
        return slots, state

    def predictions(self, out: Tensor, top_ks: list[int], rows) -> list[Prediction]:  # type: ignore[no-untyped-def]
        """Head outputs → predictions for the given rows of `out`."""
        rows = list(rows)
        if not rows:
            return []
        every_row = len(rows) == out.shape[0] and rows == list(range(len(rows)))
        sub = (out if every_row else out[rows]).float().cpu()  # [R, out]
        if self.config.head_kind == "regression":
            return [Prediction(values=tuple(v)) for v in sub.tolist()]
        k_max = max(1, min(max(top_ks), sub.shape[1]))
        probs = torch.softmax(sub, dim=1)
        top_p, top_i = probs.topk(k_max, dim=1)
        ids, ps = top_i.tolist(), top_p.tolist()
        # Tuples: an idle session keeps its last prediction, and the collector stops tracking
        # a tuple of numbers at its first collection (two lists a session were tracked for
        # life, and walked by every thaw of the frozen heap).
        return [
            Prediction(top_ids=tuple(ids[r][:k]), top_probs=tuple(ps[r][:k]))
            for r, k in enumerate(max(1, k) for k in top_ks)
        ]

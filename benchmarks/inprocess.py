"""Measurements without RPC, in this process: the compute ceiling and the stateless baseline.

- `batched_step`: the server's own runner executing one batched step of B single-token rows
  (gather, fused step, scatter, top-k predictions): what the model costs per token, with no
  gRPC, no event loop and no scheduler.
- `generation_step`: the same runner executing one step of B generate rows, as a running
  generation's steps are (sample each row's next token from the head output the last step
  kept, feed it, keep the new head output): the raw step of the Generate path.
- `stateless_per_token`: a server that keeps no state re-runs the whole history for every new
  token: one whole-sequence call over `history` tokens from the zero state per prediction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from service.models import SequenceModel
from service.registry.store import ModelStore
from service.runtime.runner import ModelRunner
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.state_pool import ByteBudget, StatePool
from service.runtime.step_batch import Head, Row, StepBatch


@dataclass(frozen=True)
class Timing:
    calls: int
    seconds: float  # wall time over all calls

    @property
    def per_call(self) -> float:
        return self.seconds / self.calls


def load_model(store: Path, name: str, version: str = "") -> SequenceModel:
    s = ModelStore(store)
    return s.load(name, s.resolve(name, version)).model


def _time(fn, min_seconds: float, min_calls: int) -> Timing:  # type: ignore[no-untyped-def]
    fn()  # warm up (first call builds fused weights, allocates)
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if calls >= min_calls and elapsed >= min_seconds:
            return Timing(calls, elapsed)


def step_function(model: SequenceModel, batch: int) -> Callable[[], None]:
    """One `ModelRunner.execute` of `batch` single-token feed rows (top-5 predictions), as a
    function to call again and again."""
    config = model.config
    pool = StatePool(config, ByteBudget(1 << 34), initial_slots=batch, head=model.head)
    runner = ModelRunner(model, pool)
    slots = [pool.allocate() for _ in range(batch)]
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, config.input_dim, (batch,), generator=gen)

    def step() -> None:
        rows = [Row(slot=s, inputs=tokens[i : i + 1], top_k=5) for i, s in enumerate(slots)]
        runner.execute(StepBatch(rows))

    return step


def generation_step_function(model: SequenceModel, batch: int) -> Callable[[], None]:
    """One `ModelRunner.execute` of `batch` generate rows at temperature 1 (what `seqserve
    loadtest --generate-fraction 1` asks for), each row's head output taken from the step
    before as a running generation's is, as a function to call again and again."""
    config = model.config
    pool = StatePool(config, ByteBudget(1 << 34), initial_slots=batch, head=model.head)
    runner = ModelRunner(model, pool)
    slots = [pool.allocate() for _ in range(batch)]
    rngs = [SessionRng.seeded(batch * 1000 + i) for i in range(batch)]
    sampling = SamplingParams(temperature=1.0)
    heads: list[Head | None] = [None] * batch  # the first step computes them from the state

    def step() -> None:
        rows = [
            Row(slot=s, inputs=None, sampling=sampling, rng=rngs[i], head=heads[i])
            for i, s in enumerate(slots)
        ]
        for i, result in enumerate(runner.execute(StepBatch(rows)).results):
            heads[i] = result.head

    return step


def generation_step(model: SequenceModel, batch: int, min_seconds: float) -> Timing:
    """`generation_step_function`'s step, back to back."""
    return _time(generation_step_function(model, batch), min_seconds, min_calls=20)


def batched_step(model: SequenceModel, batch: int, min_seconds: float) -> Timing:
    """`step_function`'s step, back to back."""
    return _time(step_function(model, batch), min_seconds, min_calls=20)


def stateless_per_token(model: SequenceModel, history: int, min_seconds: float) -> Timing:
    """Predict the next token from the whole history, from the zero state, every time."""
    gen = torch.Generator().manual_seed(history)
    tokens = torch.randint(0, model.config.input_dim, (1, history), generator=gen)
    lengths = torch.tensor([history])

    def predict() -> None:
        model.run_chunk(tokens, model.zero_state(1), lengths)

    return _time(predict, min_seconds, min_calls=3)

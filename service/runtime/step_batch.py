"""The plain data that crosses from the step scheduler to the model runner, and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from service.models import RecurrentState
from service.runtime.sampler import SamplingParams, SessionRng

# A step's head outputs [B, out] and one row's index in them: what a generation samples its
# next token from. A generation's rows follow each other step after step, so the output its
# last step computed is kept for the next, not computed again from the state.
Head = tuple[Tensor, int]


@dataclass
class Row:
    """One session's share of a batched step."""

    slot: int  # the session's state-pool slot
    inputs: Tensor | None  # [T] int64 tokens or [T, D] frames to consume; None = generate
    sampling: SamplingParams | None = None  # generate rows: sample from the last output, feed it
    rng: SessionRng | None = None  # generate rows: the session's RNG
    top_k: int = 0  # feed rows: top entries of the prediction to return (token models)
    per_position: bool = False  # feed rows: also return a prediction at every input position
    # Generate rows: the head output after the session's last input, where the step that fed
    # it kept it (`RowResult.head`), so it is not computed again; None: from the state.
    head: Head | None = None


@dataclass
class StepBatch:
    rows: list[Row]  # at most one row per session


@dataclass(slots=True)
class Prediction:
    """A token model's top-k next tokens, or a regression model's output vector. Slots, and
    the shared empty tuple for an unused field: every idle session keeps its last reply (for a
    retry), so this is per-session memory."""

    top_ids: Sequence[int] = ()
    top_probs: Sequence[float] = ()
    values: Sequence[float] = ()


@dataclass(slots=True)  # one per row of every step
class RowResult:
    consumed: int  # inputs fed into the state this step (the sampled token counts as one)
    prediction: Prediction | None = None  # after the last input (feed rows)
    per_position: Sequence[Prediction] = ()  # feed rows that asked for it: one per input
    token: int | None = None  # generate rows: the sampled (and consumed) token
    position: int = -1  # the session's position right after this row (set by the scheduler)
    head: Head | None = None  # generate rows: the head output after the sampled token


@dataclass
class StepTimings:
    gather_seconds: float = 0.0
    forward_seconds: float = 0.0
    scatter_seconds: float = 0.0
    sample_seconds: float = 0.0  # sampling plus turning outputs into predictions
    cpu_seconds: float = 0.0  # CPU time of the thread that ran the step (not wall time)


@dataclass
class StepOutput:
    results: list[RowResult]  # one per row, in batch order
    timings: StepTimings
    # The rows' state before the step, (slots [B], state) per part of the batch: what
    # `ModelRunner.undo` writes back when the step must not count.
    before: list[tuple[Tensor, RecurrentState]] = field(default_factory=list)

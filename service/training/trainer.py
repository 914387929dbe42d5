"""What both training tasks share: the options, the result, seeding, and the step loop.

A task (text or series) owns its data, its loss and its evaluation; this module owns how a
model is optimised: Adam, linear warm-up then cosine decay of the learning rate, gradient-norm
clipping, and a tqdm progress bar. Given the same seed and thread count a run is bit-for-bit
repeatable: every random choice comes from `torch.manual_seed` or a seeded NumPy generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from service.models import CellKind, ModelConfig, SequenceModel

# Fraction of steps spent warming the learning rate up from zero.
WARMUP_FRACTION = 0.05
# The cosine decay ends at this fraction of the peak learning rate, not at zero.
FINAL_LR_FRACTION = 0.05
# `final_loss` is the mean training loss over this trailing fraction of steps (one step is noisy).
FINAL_LOSS_FRACTION = 0.1
CLIP_NORM = 1.0


@dataclass(frozen=True)
class TrainOptions:
    cell: CellKind  # "lstm" or "gru"
    reset_after: bool  # GRU only: True = torch's GRU, False = the article's
    num_layers: int
    hidden_size: int
    embed_dim: int  # token embedding width, or input_proj output width for frames
    steps: int  # optimiser steps
    batch_size: int  # sequences per step
    seq_len: int  # time steps per sequence (the truncated-BPTT window)
    lr: float  # peak learning rate
    seed: int


@dataclass(frozen=True)
class TrainResult:
    config: ModelConfig
    state_dict: dict[str, Tensor]  # ready to publish: torch's names, raw units in and out
    description: str  # one line on what the model is
    data: str  # the data set, precise enough to find it again
    final_loss: float
    validation: dict[str, float]  # the model's figures on held-out data
    baselines: dict[str, float]  # the trivial baseline's figures, same keys


@dataclass(frozen=True)
class BaselineShortfall:
    """A validation figure that did not beat the trivial baseline's."""

    metric: str
    value: float
    baseline: float


def baseline_shortfalls(result: TrainResult) -> list[BaselineShortfall]:
    """Every validation figure no better than its baseline's. All of them are errors (bits per
    byte, MAE, RMSE): lower is better, so a tie is a shortfall too (nothing was learned)."""
    return [
        BaselineShortfall(metric, value, result.baselines[metric])
        for metric, value in sorted(result.validation.items())
        if metric in result.baselines and not value < result.baselines[metric]
    ]


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch and Python's `random`; return the NumPy generator the task draws data from."""
    torch.manual_seed(seed)
    random.seed(seed)
    return np.random.default_rng(seed)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)


def run_steps(
    model: SequenceModel,
    step_loss: Callable[[int], Tensor],
    steps: int,
    lr: float,
    progress: bool = True,
    unit: str = "loss",
) -> float:
    """Optimise `model` for `steps` steps of `step_loss(step)`; return the final loss."""
    assert steps >= 1, f"need at least one step, got {steps}"
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix({unit: f"{losses[-1]:.4f}"}, refresh=False)
    model.eval()
    tail = max(1, int(steps * FINAL_LOSS_FRACTION))
    return float(np.mean(losses[-tail:]))


def export_state_dict(model: SequenceModel) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies of the weights, in torch's names."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}

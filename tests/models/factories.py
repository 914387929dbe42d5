"""Seeded models, inputs and states for the model tests (torch side; the oracle is reference.py)."""

from __future__ import annotations

import numpy as np
import torch

from service.models import ModelConfig, RecurrentState, SequenceModel

# (cell, reset_after): LSTM, torch's reset-after GRU, the article's GRU.
CELLS = [("lstm", True), ("gru", True), ("gru", False)]
CELL_IDS = ["lstm", "gru-reset-after", "gru-article"]
# (input_kind, head_kind): every combination the config allows.
IO_KINDS = [("tokens", "classification"), ("tokens", "regression"), ("features", "regression")]
IO_IDS = ["tokens-cls", "tokens-reg", "features-reg"]

VOCAB = 40  # token vocabulary (and logits width for classification)
FRAME = 7  # floats per feature frame
EMBED = 12  # width into the first layer (!= HIDDEN, so [h, x] is not square)
HIDDEN = 16
REG_OUT = 5  # regression output width
ATOL = 1e-5  # float32 model vs float64 reference


def make_config(
    cell: str, reset_after: bool, num_layers: int, input_kind: str, head_kind: str
) -> ModelConfig:
    input_dim = VOCAB if input_kind == "tokens" else FRAME
    return ModelConfig(
        cell=cell,  # type: ignore[arg-type]
        num_layers=num_layers,
        hidden_size=HIDDEN,
        input_kind=input_kind,  # type: ignore[arg-type]
        input_dim=input_dim,
        embed_dim=EMBED,
        head_kind=head_kind,  # type: ignore[arg-type]
        output_dim=VOCAB if head_kind == "classification" else REG_OUT,
        reset_after=reset_after,
    )


def make_model(config: ModelConfig, seed: int = 0, scale: float = 0.5) -> SequenceModel:
    """A SequenceModel with every parameter drawn from a seeded generator (eval mode).

    Weights uniform(±scale) are larger than torch's default for H=16, so gates spread away from
    0.5 and a convention error (z vs 1 − z, gate order) shows up clearly.
    """
    torch.manual_seed(seed)
    model = SequenceModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embedding.weight":
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.uniform_(-scale, scale, generator=gen)
    return model.eval()


def random_inputs(config: ModelConfig, batch: int, steps: int, rng: np.random.Generator):
    """tokens [B, T] int64 or frames [B, T, D] float32."""
    if config.input_kind == "tokens":
        return rng.integers(0, config.input_dim, size=(batch, steps), dtype=np.int64)
    return rng.normal(size=(batch, steps, config.input_dim)).astype(np.float32)


def random_state(
    config: ModelConfig, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """A nonzero (h0 [L, B, H], c0 [L, B, H] or None), float32."""
    shape = (config.num_layers, batch, config.hidden_size)
    h0 = rng.uniform(-0.9, 0.9, size=shape).astype(np.float32)
    c0 = rng.normal(0.0, 1.5, size=shape).astype(np.float32) if config.has_cell_state else None
    return h0, c0


def to_state(h0: np.ndarray, c0: np.ndarray | None) -> RecurrentState:
    return RecurrentState(
        torch.from_numpy(h0.copy()), None if c0 is None else torch.from_numpy(c0.copy())
    )


def state_numpy(state: RecurrentState) -> tuple[np.ndarray, np.ndarray | None]:
    return state.h.numpy(), None if state.c is None else state.c.numpy()

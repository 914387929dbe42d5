"""Sampling the next token: temperature, top-k, top-p, batched over rows.

Each row draws one uniform number from its session's own RNG (numpy PCG64), so a seeded session
generates the same tokens whether it runs alone or batched with others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SamplingParams:
        """From `dataclasses.asdict` output read back from JSON (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})  # type: ignore[arg-type]

    def validate(self, vocab_size: int, max_tokens_cap: int) -> None:
        if not (self.temperature >= 0.0 and self.temperature <= 100.0):
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if not (1 <= self.max_tokens <= max_tokens_cap):
            raise InvalidArgument(
                f"max_tokens must be in [1, {max_tokens_cap}], got {self.max_tokens}"
            )
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument(f"stop token ids out of range [0, {vocab_size}): {bad}")
        if any(s == "" for s in self.stop_strings):
            raise InvalidArgument("stop strings must not be empty")


@dataclass
class SessionRng:
    """A session's random stream; its state travels with the session (fork, spill)."""

    generator: np.random.Generator = field(default_factory=np.random.default_rng)

    @classmethod
    def seeded(cls, seed: int | None) -> SessionRng:
        return cls(np.random.Generator(np.random.PCG64(seed)))

    def uniform(self) -> float:
        return float(self.generator.random())

    def skip(self, draws: int) -> None:
        """Move on by `draws` uniform numbers without drawing them (journal replay)."""
        if draws:
            self.generator.bit_generator.advance(draws)  # type: ignore[attr-defined]

    def rewind(self, draws: int) -> None:
        """Step back `draws` uniform numbers (a step that did not count). PCG64 advances
        modulo 2**128, so a step back is a step of 2**128 - 1."""
        if draws:
            self.generator.bit_generator.advance(2**128 - draws)  # type: ignore[attr-defined]

    def get_state(self) -> dict:
        return dict(self.generator.bit_generator.state)

    @classmethod
    def from_state(cls, state: dict) -> SessionRng:
        bit_gen = np.random.PCG64()
        bit_gen.state = state  # type: ignore[assignment]
        return cls(np.random.Generator(bit_gen))


def sample(logits: Tensor, params: list[SamplingParams], rngs: list[SessionRng]) -> Tensor:
    """logits [G, V] → token ids [G] (int64)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    if greedy:
        out[greedy] = logits[greedy].argmax(dim=1).cpu()
    rand = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if not rand:
        return out
    sub = logits[rand].float().cpu()  # [R, V]
    temps = torch.tensor([params[i].temperature for i in rand]).unsqueeze(1)  # [R, 1]
    sorted_logits, order = torch.sort(sub / temps, dim=1, descending=True)  # [R, V]
    probs = torch.softmax(sorted_logits, dim=1)  # [R, V]
    rank = torch.arange(vocab).unsqueeze(0)  # [1, V]
    top_k = torch.tensor([params[i].top_k or vocab for i in rand]).unsqueeze(1)  # [R, 1]
    top_p = torch.tensor([params[i].top_p for i in rand]).unsqueeze(1)  # [R, 1]
    mass_before = torch.cumsum(probs, dim=1) - probs  # [R, V]: mass of strictly better tokens
    keep = (rank < top_k) & ((mass_before < top_p) | (rank == 0))  # the best always stays
    cdf = torch.cumsum(probs * keep, dim=1)  # [R, V]
    u = torch.tensor([rngs[i].uniform() for i in rand], dtype=cdf.dtype).unsqueeze(1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)  # [R, 1]
    # Never land on a cut token through rounding at the top of the cdf.
    pick = torch.minimum(pick, keep.sum(dim=1, keepdim=True) - 1)
    out[rand] = order.gather(1, pick).squeeze(1)
    return out

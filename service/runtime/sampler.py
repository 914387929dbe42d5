"""Sampling the next token: temperature, top-k, top-p, batched over rows.

Each row draws one uniform number from its session's own RNG (numpy PCG64), so a seeded session
generates the same tokens whether it runs alone or batched with others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.errors import InvalidArgument, quote_list

# Bounds on the stop conditions, checked against every token: without them one Generate's
# 200,000 stop strings cost the event loop ~12 ms a token, and a session's default sampling
# that large made its Session message (CreateSession's reply) too big to send.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_BYTES = 256
MAX_STOP_TOKEN_IDS = 1024


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16

    def as_dict(self) -> dict[str, Any]:
        """What `dataclasses.asdict` gives (every field is a scalar or a tuple of them), at a
        tenth of its cost: it is journaled with every new session."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS}

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
        # The counts first: a list over its cap is refused for its length, unread.
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}"
            )
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise InvalidArgument(
                f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop_strings)}"
            )
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:  # a few of them: every one made a status too big to send (1,024 → 13 KB)
            raise InvalidArgument(
                f"stop token ids out of range [0, {vocab_size}): {quote_list(bad)}"
            )
        if any(s == "" for s in self.stop_strings):
            raise InvalidArgument("stop strings must not be empty")
        if any(len(s.encode()) > MAX_STOP_STRING_BYTES for s in self.stop_strings):
            raise InvalidArgument(f"a stop string may have at most {MAX_STOP_STRING_BYTES} bytes")


# Frozen, so one instance serves every session that keeps the defaults.
DEFAULT_SAMPLING = SamplingParams()
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


class SessionRng:
    """A session's random stream (numpy PCG64); its state travels with the session (fork,
    spill).

    A seeded stream is held as (seed, draws) until something draws from it: the numpy
    generator (~0.9 KB) is built on first use, at the same point of the stream (PCG64 jumps
    ahead in O(log n)). Most sessions never generate, so most never build one. A stream read
    back from a record (`from_state`) is a generator from the start where the record holds
    numpy's state, and a seed and a count where it holds those (`record_state`)."""

    __slots__ = ("_draws", "_generator", "_seed")

    def __init__(self, generator: np.random.Generator | None = None) -> None:
        self._seed: int | None = None
        self._draws = 0  # uniform numbers drawn from the seeded stream, while not built
        self._generator: np.random.Generator | None = (
            generator if generator is not None else np.random.default_rng()
        )

    @classmethod
    def seeded(cls, seed: int | None) -> SessionRng:
        if seed is None:
            return cls(np.random.Generator(np.random.PCG64(None)))
        rng = cls.__new__(cls)
        rng._seed, rng._draws, rng._generator = seed, 0, None
        return rng

    @property
    def built(self) -> bool:
        """Whether the numpy generator exists (False: only a seed and a count are held)."""
        return self._generator is not None

    def _built(self) -> np.random.Generator:
        if self._generator is None:
            self._generator = self._build()
        return self._generator

    def _build(self) -> np.random.Generator:
        bit_gen = np.random.PCG64(self._seed)
        if self._draws:  # PCG64 advances modulo 2**128: a negative count steps back
            bit_gen.advance(self._draws % 2**128)  # type: ignore[attr-defined]
        return np.random.Generator(bit_gen)

    def uniform(self) -> float:
        return float(self._built().random())  # one 64-bit output: one step of the stream

    def skip(self, draws: int) -> None:
        """Move on by `draws` uniform numbers without drawing them (journal replay)."""
        if not draws:
            return
        if self._generator is None:
            self._draws += draws
        else:
            self._generator.bit_generator.advance(draws)  # type: ignore[attr-defined]

    def rewind(self, draws: int) -> None:
        """Step back `draws` uniform numbers (a step that did not count). PCG64 advances
        modulo 2**128, so a step back is a step of 2**128 - 1."""
        if not draws:
            return
        if self._generator is None:
            self._draws -= draws
        else:
            self._generator.bit_generator.advance(2**128 - draws)  # type: ignore[attr-defined]

    def get_state(self) -> dict:
        generator = self._generator if self._generator is not None else self._build()
        return dict(generator.bit_generator.state)

    def record_state(self) -> dict:
        """The state a record keeps: `{"seed", "draws"}` while the generator is not built
        (building one to read its state cost ~40 µs a checkpoint), numpy's PCG64 state once
        it is. `from_state` reads both."""
        if self._generator is None:
            return {"seed": self._seed, "draws": self._draws}
        return self.get_state()

    def copy(self) -> SessionRng:
        """An independent stream at the same point (a fork's)."""
        if self._generator is None:
            twin = SessionRng.seeded(self._seed)
            twin._draws = self._draws
            return twin
        return SessionRng.from_state(self.get_state())

    @classmethod
    def from_state(cls, state: dict) -> SessionRng:
        """The stream `get_state` or `record_state` described; a seed and a count stay so."""
        if "seed" in state:
            rng = cls.seeded(int(state["seed"]))
            rng._draws = int(state["draws"])
            return rng
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
    every = len(rand) == rows
    sub = (logits if every else logits[rand]).float().cpu()  # [R, V]
    chosen = params if every else [params[i] for i in rand]
    if any(p.temperature != 1.0 for p in chosen):  # x / 1.0 is x: skip the division
        # Each row's best at 0 first: a tiny temperature (1e-38) then sends the others to
        # -inf, not the best to +inf (inf - inf is NaN: a garbage draw). The softmax is the
        # same function of the shifted row.
        sub = sub - sub.max(dim=1, keepdim=True).values
        sub = sub / torch.tensor([p.temperature for p in chosen]).unsqueeze(1)  # [R, 1]
    sorted_logits, order = sort_descending(sub)  # [R, V]; the order only for a NaN row
    probs = torch.softmax(sorted_logits, dim=1)  # [R, V]
    if all(p.top_k in (0, vocab) and p.top_p >= 1.0 for p in chosen):
        # No cut: every token is kept, `keep` would be all ones.
        cdf = torch.cumsum(probs, dim=1)  # [R, V]
        kept = None
    else:
        rank = torch.arange(vocab).unsqueeze(0)  # [1, V]
        top_k = torch.tensor([p.top_k or vocab for p in chosen]).unsqueeze(1)  # [R, 1]
        top_p = torch.tensor([p.top_p for p in chosen]).unsqueeze(1)  # [R, 1]
        mass_before = torch.cumsum(probs, dim=1) - probs  # [R, V]: mass of strictly better tokens
        keep = (rank < top_k) & ((mass_before < top_p) | (rank == 0))  # the best always stays
        cdf = torch.cumsum(probs * keep, dim=1)  # [R, V]
        kept = keep.sum(dim=1, keepdim=True)
    u = torch.tensor([rngs[i].uniform() for i in rand], dtype=cdf.dtype).unsqueeze(1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)  # [R, 1]
    if kept is not None:  # never land on a cut token through rounding at the top of the cdf
        pick = torch.minimum(pick, kept - 1)
    if order is not None:
        tokens = order.gather(1, pick).squeeze(1)
    else:
        tokens = ranked_tokens(sub, sorted_logits, pick)
    if every:
        return tokens
    out[rand] = tokens
    return out


def sort_descending(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The values of `torch.sort(x, dim=1, descending=True)` for a CPU float32 [R, V], and its
    order where that had to be computed (None otherwise: `ranked_tokens` finds the one token a
    draw needs).

    torch's sort is slow on short rows (~0.45 ms for 64 rows of 256 here) and numpy's argsort
    ~0.08 ms, while numpy's sort of the values alone is ~0.01 ms (a vectorised sort): a draw
    needs every sorted value (for the softmax and the cdf) but the position of one. Sorted
    values are the same numbers whatever the algorithm's order among equal ones (0.0 and -0.0
    compare equal and give the same softmax). A row with a NaN is sorted by torch (numpy puts
    NaN last, torch first).
    """
    a = x.numpy()  # the same memory
    if np.isnan(a).any():
        return torch.sort(x, dim=1, descending=True)
    # Ascending of -x, negated back: descending of x, exactly (negation is exact).
    return torch.from_numpy(np.negative(np.sort(np.negative(a), axis=1))), None


def ranked_tokens(x: Tensor, values: Tensor, ranks: Tensor) -> Tensor:
    """The token at rank `ranks[r]` of row r of x [R, V] in torch.sort's descending order
    (`values` from `sort_descending`) → [R] int64.

    A value that occurs once in its row is its own token. Where the drawn value is tied, the
    order among equal values is torch's (not a stable one: its vectorised sort), so that row
    alone is sorted by torch; a row's order does not depend on the rows beside it.
    """
    a = x.numpy()
    drawn = values.gather(1, ranks).numpy()  # [R, 1]
    same = a == drawn  # [R, V]
    tokens = same.argmax(axis=1)  # the first equal entry
    for r in np.flatnonzero(same.sum(axis=1) > 1).tolist():
        order = torch.sort(x[r : r + 1], dim=1, descending=True).indices
        tokens[r] = int(order[0, int(ranks[r, 0])])
    return torch.from_numpy(tokens.astype(np.int64, copy=False))

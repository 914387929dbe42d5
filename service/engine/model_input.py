"""One input chunk as a client sent it, and its validation into the tensor a model consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import InvalidArgument, quote_list
from service.models import ByteTokenizer, ModelConfig


@dataclass(frozen=True)
class ModelInput:
    """Exactly one of the three is set."""

    tokens: Sequence[int] | None = None
    text: str | None = None
    frames: Sequence[float] | None = None

    def size(self) -> int:
        """Inputs it carries, roughly, for quotas: tokens, text bytes, or frame values."""
        if self.tokens is not None:
            return len(self.tokens)
        if self.text is not None:
            return len(self.text.encode())
        return len(self.frames or ())


_ONE_TOKEN_INPUTS: dict[int, ModelInput] = {}
# The largest frame value taken: far beyond any measurement, far below float32's overflow. A
# finite 3e38 overflowed the first layer's matmul to inf, and the session's state to NaN for
# good (every later prediction NaN).
MAX_FRAME_VALUE = 1e15
_ONE_TOKEN_CACHED_BELOW = 4096  # token ids with a shared input; a larger id gets its own


def one_token(token_id: int) -> ModelInput:
    """The input of one token: shared per token id (a ModelInput is immutable), since building
    one per streamed token cost more than the rest of converting the request."""
    inp = _ONE_TOKEN_INPUTS.get(token_id)
    if inp is None:
        inp = ModelInput(tokens=(token_id,))
        if 0 <= token_id < _ONE_TOKEN_CACHED_BELOW:
            _ONE_TOKEN_INPUTS[token_id] = inp
    return inp


_SINGLE_TOKENS: list[Tensor] = []


def _single_token(token_id: int) -> Tensor:
    """A shared [1] int64 tensor per token id, made once: building one per request costs more
    than the rest of the input path. Shared, so never modified (the runner copies inputs)."""
    while len(_SINGLE_TOKENS) <= token_id:
        start = len(_SINGLE_TOKENS)
        _SINGLE_TOKENS.extend(torch.arange(start, max(2 * start, token_id + 1, 256)).view(-1, 1))
    return _SINGLE_TOKENS[token_id]


def to_tensor(
    inp: ModelInput, name: str, cfg: ModelConfig, tokenizer: ByteTokenizer | None, cap: int
) -> Tensor:
    """Validate one chunk against model `name`; tokens → [T] int64, frames → [T, D] float32.
    `cap` is the longest chunk accepted. Raises InvalidArgument saying what is wrong."""
    given = [x is not None for x in (inp.tokens, inp.text, inp.frames)]
    if sum(given) != 1:
        raise InvalidArgument("input must set exactly one of tokens, text or frames")
    if inp.frames is not None:
        if cfg.input_kind != "features":
            raise InvalidArgument(f"model {name!r} takes tokens or text, not frames")
        n = len(inp.frames)
        if n == 0 or n % cfg.input_dim:
            raise InvalidArgument(
                f"frames must be a non-empty multiple of the frame size {cfg.input_dim}; "
                f"got {n} values"
            )
        if n // cfg.input_dim > cap:
            raise InvalidArgument(f"chunk of {n // cfg.input_dim} frames exceeds {cap}")
        frames = torch.tensor(inp.frames, dtype=torch.float32).view(-1, cfg.input_dim)
        if not bool(torch.isfinite(frames).all()):
            raise InvalidArgument("frames must be finite numbers")
        if bool((frames.abs() > MAX_FRAME_VALUE).any()):
            raise InvalidArgument(f"frame values must be within ±{MAX_FRAME_VALUE:g}")
        return frames
    if cfg.input_kind != "tokens" or tokenizer is None:
        raise InvalidArgument(f"model {name!r} takes feature frames, not tokens or text")
    if inp.tokens is not None and len(inp.tokens) == 1 and 0 <= inp.tokens[0] < cfg.input_dim:
        return _single_token(inp.tokens[0])  # the common streaming case: one new token
    ids = list(inp.tokens) if inp.tokens is not None else tokenizer.encode(inp.text or "")
    if not ids:
        raise InvalidArgument("input is empty")
    if len(ids) > cap:
        raise InvalidArgument(f"chunk of {len(ids)} tokens exceeds the limit of {cap}")
    bad = [t for t in ids if not 0 <= t < cfg.input_dim]
    if bad:
        raise InvalidArgument(f"token ids out of range [0, {cfg.input_dim}): {quote_list(bad)}")
    return torch.tensor(ids, dtype=torch.int64)

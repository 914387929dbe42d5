"""The weights file: safetensors bytes, their sha256, and the check that they fit a config.

Only safetensors is ever read (no pickle), and only after the caller has checked the digest of
the very bytes it is about to parse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import safetensors.torch
import torch

from service.errors import WeightsMismatch
from service.models import ModelConfig, SequenceModel

WEIGHTS_DTYPE = torch.float32


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape a model of `config` has (DESIGN section 2's torch names)."""
    # Built on the meta device: shapes without allocating or initialising any weights.
    with torch.device("meta"):
        model = SequenceModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(tensors: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Raise WeightsMismatch, listing every difference, unless `tensors` fit `config` exactly."""
    want = expected_shapes(config)
    problems: list[str] = []
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing:
        problems.append("missing " + ", ".join(f"{n} {list(want[n])}" for n in missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    for name in sorted(set(want) & set(tensors)):
        got = tensors[name]
        if tuple(got.shape) != want[name]:
            problems.append(f"{name} has shape {list(got.shape)}, expected {list(want[name])}")
        elif got.dtype != WEIGHTS_DTYPE:
            problems.append(f"{name} has dtype {got.dtype}, expected {WEIGHTS_DTYPE}")
    if problems:
        raise WeightsMismatch(f"{source}: tensors do not match the model: " + "; ".join(problems))


def serialize(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of `state_dict` as contiguous float32 CPU tensors."""
    # clone(): safetensors refuses tensors that share storage (e.g. tied weights).
    tensors = {
        name: t.detach().to(device="cpu", dtype=WEIGHTS_DTYPE).contiguous().clone()
        for name, t in state_dict.items()
    }
    return safetensors.torch.save(tensors)


def deserialize(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes. The caller verifies their digest first."""
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own untyped errors on malformed input
        raise WeightsMismatch(f"{source}: not a valid safetensors file: {exc}") from exc

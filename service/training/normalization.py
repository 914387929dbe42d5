"""Affine normalisation for feature-frame models, and folding it into the weights.

Training works in standardised units; serving takes raw frames and returns raw values. Both
ends are affine maps next to a Linear layer, so they fold into it exactly:

    input_proj((x - mean) / std) = (W / std) x + (b - W (mean / std))
    std * head(h) + mean         = (std * W_head) h + (std * b_head + mean)

After `fold_normalization` the published weights need no normalisation parameters at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.models import SequenceModel


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray  # [D] float64
    std: np.ndarray  # [D] float64, > 0

    @classmethod
    def fit(cls, values: np.ndarray) -> Standardizer:
        """values [N, D] or [N] → per-column mean and std (a constant column gets std 1)."""
        columns = values.reshape(values.shape[0], -1)  # [N, D]
        std = columns.std(axis=0)
        return cls(mean=columns.mean(axis=0), std=np.where(std > 0, std, 1.0))

    def apply(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def invert(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean


@torch.no_grad()
def fold_normalization(model: SequenceModel, inputs: Standardizer, outputs: Standardizer) -> None:
    """Rewrite `model` in place so raw frames in give raw values out."""
    config = model.config
    assert config.input_kind == "features", "only a feature-frame model has input_proj"
    assert config.head_kind == "regression", "only a regression head has raw output units"
    assert inputs.mean.size == config.input_dim, "input standardiser width != frame dim"
    assert outputs.mean.size == config.output_dim, "output standardiser width != head dim"
    proj, head = model.input_proj, model.head
    in_mean = _like(inputs.mean, proj.weight)  # [D]
    in_std = _like(inputs.std, proj.weight)  # [D]
    scaled = proj.weight / in_std  # [E, D]
    proj.bias.copy_(proj.bias - scaled @ in_mean)  # uses the new W, as the identity says
    proj.weight.copy_(scaled)
    out_mean = _like(outputs.mean, head.weight)  # [O]
    out_std = _like(outputs.std, head.weight)  # [O]
    head.weight.mul_(out_std.unsqueeze(1))  # [O, H]
    head.bias.copy_(head.bias * out_std + out_mean)


def _like(values: np.ndarray, ref: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=ref.dtype, device=ref.device)

"""The article's stacked GRU (reset applied to h before the hidden matmul).

torch has no module for it, so this is our own, with nn.GRU's parameter names and shapes
(`weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`, gates r, z, n) so its
state dict reads like torch's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from service.models.cells import gru_cell


class ArticleGRU(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        bound = 1.0 / math.sqrt(hidden_size)  # torch's GRU initialisation
        for k in range(num_layers):
            width = input_size if k == 0 else hidden_size
            for name, shape in (
                (f"weight_ih_l{k}", (3 * hidden_size, width)),
                (f"weight_hh_l{k}", (3 * hidden_size, hidden_size)),
                (f"bias_ih_l{k}", (3 * hidden_size,)),
                (f"bias_hh_l{k}", (3 * hidden_size,)),
            ):
                self.register_parameter(
                    name, nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
                )

    def layer_weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            getattr(self, f"weight_ih_l{k}"),
            getattr(self, f"weight_hh_l{k}"),
            getattr(self, f"bias_ih_l{k}"),
            getattr(self, f"bias_hh_l{k}"),
        )

    def forward(
        self, x: Tensor, h0: Tensor, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x [B, T, I], h0 [L, B, H], lengths [B] (rows stop at their length) →
        (outputs [B, T, H] of the last layer, h_n [L, B, H])."""
        steps = x.shape[1]
        layer_in = x
        finals = []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(k)
            h = h0[k]  # [B, H]
            outs = []
            for t in range(steps):
                h_new = gru_cell(layer_in[:, t], h, w_ih, w_hh, b_ih, b_hh, reset_after=False)
                if lengths is not None:
                    live = (t < lengths).unsqueeze(1)  # [B, 1]: row still inside its chunk
                    h_new = torch.where(live, h_new, h)
                h = h_new
                outs.append(h)
            layer_in = torch.stack(outs, dim=1)  # [B, T, H]
            finals.append(h)
        return layer_in, torch.stack(finals, dim=0)

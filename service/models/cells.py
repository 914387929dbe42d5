"""One step of each recurrent cell, written from the article's equations.

Weights use torch's layout: `w_ih` [G*H, I] and `w_hh` [G*H, H] with gate blocks stacked in
torch's order (LSTM i, f, g, o; GRU r, z, n). The article writes W·[h_{t-1}, x_t] with one matrix
per gate; that matrix is `cat([w_hh_gate, w_ih_gate], dim=1)` and its bias is
`b_ih_gate + b_hh_gate`, so the split form below is the same arithmetic.

GRU z follows torch's convention, h_t = (1 − z)·h̃ + z·h_{t−1}: the article's z is 1 − ours
(its W_z, b_z are ours negated). `reset_after=True` is torch/cuDNN's GRU (r multiplies
W_hn·h + b_hn); `reset_after=False` is the article's (r multiplies h before W_hn).
"""

from __future__ import annotations

import torch
from torch import Tensor


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor]:
    """x [B, I], h/c [B, H] → (h_t, C_t) [B, H]."""
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # [B, 4H]
    i, f, g, o = gates.chunk(4, dim=1)  # each [B, H]
    c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # C_t = f*C + i*C̃
    h_t = torch.sigmoid(o) * torch.tanh(c_t)  # h_t = o * tanh(C_t)
    return h_t, c_t


def gru_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
    reset_after: bool,
) -> Tensor:
    """x [B, I], h [B, H] → h_t [B, H]."""
    hidden = h.shape[1]
    gi = x @ w_ih.T + b_ih  # [B, 3H]
    w_hh_rz, w_hh_n = w_hh[: 2 * hidden], w_hh[2 * hidden :]  # [2H, H], [H, H]
    b_hh_rz, b_hh_n = b_hh[: 2 * hidden], b_hh[2 * hidden :]
    rz = torch.sigmoid(gi[:, : 2 * hidden] + h @ w_hh_rz.T + b_hh_rz)  # [B, 2H]
    r, z = rz.chunk(2, dim=1)  # each [B, H]
    if reset_after:
        n = torch.tanh(gi[:, 2 * hidden :] + r * (h @ w_hh_n.T + b_hh_n))  # torch/cuDNN
    else:
        n = torch.tanh(gi[:, 2 * hidden :] + (r * h) @ w_hh_n.T + b_hh_n)  # W_h·[r*h, x] + b_h
    return (1 - z) * n + z * h  # ours: z keeps the old state

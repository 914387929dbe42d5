"""A served sequence model: input layer → stacked LSTM/GRU → head.

Two entry points the server uses, both over explicit state (the server owns state, not the model):
- `step(inputs, state)`: one input per row, one recurrent step for the whole batch, hand-fused
  (one matmul per layer and the gate math; the token embedding is folded into a lookup table
  of first-layer input gates). On a small CPU batch this is far cheaper than the oneDNN path.
- `run_chunk(inputs, state, lengths)`: many inputs per row in one call (torch's whole-sequence
  kernel for LSTM and reset-after GRU; our own loop for the article's GRU).
`forward` is the training path (whole sequences from a given state).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from service.models.article_gru import ArticleGRU
from service.models.config import ModelConfig

# Fold the embedding into first-layer gate pre-activations when that table stays this small.
_GATE_TABLE_MAX_BYTES = 64 * 1024 * 1024


class RecurrentState(NamedTuple):
    h: Tensor  # [L, B, H]
    c: Tensor | None  # [L, B, H] for an LSTM, else None


class _FusedLayer(NamedTuple):
    w_ih_t: Tensor  # [I, G*H]
    w_hh_t: Tensor  # [H, G*H]
    b_ih: Tensor  # [G*H]
    b_hh: Tensor  # [G*H]
    w_cat_t: Tensor  # [I+H, G*H]: LSTM's one-matmul form over [x, h]
    b_sum: Tensor  # [G*H] = b_ih + b_hh


class SequenceModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.input_kind == "tokens":
            self.embedding = nn.Embedding(c.input_dim, c.embed_dim)
        else:
            self.input_proj = nn.Linear(c.input_dim, c.embed_dim)
        self.rnn: nn.Module
        if c.cell == "lstm":
            self.rnn = nn.LSTM(c.embed_dim, c.hidden_size, c.num_layers, batch_first=True)
        elif c.reset_after:
            self.rnn = nn.GRU(c.embed_dim, c.hidden_size, c.num_layers, batch_first=True)
        else:
            self.rnn = ArticleGRU(c.embed_dim, c.hidden_size, c.num_layers)
        self.head = nn.Linear(c.hidden_size, c.output_dim)
        self._fused: list[_FusedLayer] | None = None
        self._gate_table: Tensor | None = None  # [V, G*H] first-layer input gates per token

    # ---- shared pieces -------------------------------------------------------------------

    def embed(self, inputs: Tensor) -> Tensor:
        """tokens [B, T] (int64) or frames [B, T, D] → [B, T, E]."""
        if self.config.input_kind == "tokens":
            return self.embedding(inputs)
        return self.input_proj(inputs)

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> RecurrentState:
        c = self.config
        h = torch.zeros(c.num_layers, batch, c.hidden_size, device=device)
        return RecurrentState(h, torch.zeros_like(h) if c.has_cell_state else None)

    def _rnn(
        self, x: Tensor, state: RecurrentState, lengths: Tensor | None
    ) -> tuple[Tensor, RecurrentState]:
        """x [B, T, E] → (outputs [B, T, H], final state). Rows stop at `lengths` if given."""
        if isinstance(self.rnn, ArticleGRU):
            mask_lengths = None if lengths is None else lengths.to(x.device)
            out, h = self.rnn(x, state.h, mask_lengths)
            return out, RecurrentState(h, None)
        hx = (state.h, state.c) if self.config.has_cell_state else state.h
        if lengths is None or bool((lengths == x.shape[1]).all()):
            out, hn = self.rnn(x, hx)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out_packed, hn = self.rnn(packed, hx)
            out, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=x.shape[1])
        if self.config.has_cell_state:
            return out, RecurrentState(hn[0], hn[1])
        return out, RecurrentState(hn, None)

    # ---- training ------------------------------------------------------------------------

    def forward(
        self, inputs: Tensor, state: RecurrentState | None = None
    ) -> tuple[Tensor, RecurrentState]:
        """inputs [B, T] or [B, T, D] → (head outputs [B, T, out], final state)."""
        if state is None:
            state = self.zero_state(inputs.shape[0], inputs.device)
        out, new_state = self._rnn(self.embed(inputs), state, None)
        return self.head(out), new_state

    # ---- serving -------------------------------------------------------------------------

    @torch.inference_mode()
    def run_chunk(
        self,
        inputs: Tensor,
        state: RecurrentState,
        lengths: Tensor,
        all_positions: bool = False,
    ) -> tuple[Tensor, RecurrentState]:
        """Consume a padded chunk per row in one call.

        inputs [B, T] or [B, T, D]; lengths [B] (>= 1). Returns the head output after each row's
        last input [B, out] (or at every position [B, T, out] with `all_positions`), and the state
        after each row's last input.
        """
        assert bool((lengths >= 1).all()), "every row needs at least one input"
        out, new_state = self._rnn(self.embed(inputs), state, lengths)  # out [B, T, H]
        if all_positions:
            return self.head(out), new_state
        last = (lengths - 1).to(out.device)  # [B]
        h_last = out[torch.arange(out.shape[0], device=out.device), last]  # [B, H]
        return self.head(h_last), new_state

    @torch.inference_mode()
    def step(self, inputs: Tensor, state: RecurrentState) -> tuple[Tensor, RecurrentState]:
        """One recurrent step per row: tokens [B] (int64) or frames [B, D] → (head [B, out],
        new state). The input state is not modified."""
        layers = self._fused_layers()
        c = self.config
        hidden = c.hidden_size
        h_out, c_out = [], []
        if self._gate_table is not None:
            x = None
            first_gates = self._gate_table.index_select(0, inputs)  # [B, G*H]
        else:
            x = self.embed(inputs.unsqueeze(1)).squeeze(1)  # [B, E]
            first_gates = None
        for k, w in enumerate(layers):
            h = state.h[k]  # [B, H]
            if c.cell == "lstm":
                if first_gates is not None and k == 0:
                    gates = torch.addmm(first_gates, h, w.w_hh_t)  # [B, 4H]
                else:
                    assert x is not None, "layer input is set for every layer but a tabled first"
                    gates = torch.addmm(w.b_sum, torch.cat([x, h], dim=1), w.w_cat_t)
                i, f, g, o = gates.chunk(4, dim=1)
                assert state.c is not None
                cell = torch.sigmoid(f) * state.c[k] + torch.sigmoid(i) * torch.tanh(g)  # [B, H]
                h_new = torch.sigmoid(o) * torch.tanh(cell)  # [B, H]
                c_out.append(cell)
            else:
                if first_gates is not None and k == 0:
                    gi = first_gates  # [B, 3H], includes b_ih
                else:
                    assert x is not None, "layer input is set for every layer but a tabled first"
                    gi = torch.addmm(w.b_ih, x, w.w_ih_t)  # [B, 3H]
                if c.reset_after:
                    gh = torch.addmm(w.b_hh, h, w.w_hh_t)  # [B, 3H]
                    rz = torch.sigmoid(gi[:, : 2 * hidden] + gh[:, : 2 * hidden])
                    r, z = rz.chunk(2, dim=1)
                    n = torch.tanh(gi[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
                else:
                    gh_rz = torch.addmm(w.b_hh[: 2 * hidden], h, w.w_hh_t[:, : 2 * hidden])
                    rz = torch.sigmoid(gi[:, : 2 * hidden] + gh_rz)
                    r, z = rz.chunk(2, dim=1)
                    n = torch.tanh(
                        torch.addmm(
                            gi[:, 2 * hidden :] + w.b_hh[2 * hidden :],
                            r * h,
                            w.w_hh_t[:, 2 * hidden :],
                        )
                    )
                h_new = n + z * (h - n)  # (1 - z)*n + z*h
            h_out.append(h_new)
            x = h_new
        new_state = RecurrentState(
            torch.stack(h_out, dim=0), torch.stack(c_out, dim=0) if c_out else None
        )
        return self.head(x), new_state

    def invalidate_fused(self) -> None:
        """Forget the rearranged weights `step` uses; they are rebuilt on the next step."""
        self._fused = None
        self._gate_table = None

    def load_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.invalidate_fused()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        # .to(), .cuda(), .float() … move or convert the weights: the fused copies must follow.
        self.invalidate_fused()
        return super()._apply(*args, **kwargs)

    def _fused_layers(self) -> list[_FusedLayer]:
        """Weights rearranged for `step`, built once (weights are frozen when serving)."""
        if self._fused is None:
            with torch.no_grad():
                layers = []
                for k in range(self.config.num_layers):
                    w_ih = getattr(self.rnn, f"weight_ih_l{k}").detach()
                    w_hh = getattr(self.rnn, f"weight_hh_l{k}").detach()
                    b_ih = getattr(self.rnn, f"bias_ih_l{k}").detach()
                    b_hh = getattr(self.rnn, f"bias_hh_l{k}").detach()
                    layers.append(
                        _FusedLayer(
                            w_ih_t=w_ih.T.contiguous(),
                            w_hh_t=w_hh.T.contiguous(),
                            b_ih=b_ih.contiguous(),
                            b_hh=b_hh.contiguous(),
                            w_cat_t=torch.cat([w_ih, w_hh], dim=1).T.contiguous(),
                            b_sum=(b_ih + b_hh).contiguous(),
                        )
                    )
                c = self.config
                table_bytes = c.input_dim * c.gates * c.hidden_size * 4
                if c.input_kind == "tokens" and table_bytes <= _GATE_TABLE_MAX_BYTES:
                    first = layers[0]
                    bias = first.b_sum if c.cell == "lstm" else first.b_ih
                    self._gate_table = torch.addmm(
                        bias, self.embedding.weight.detach(), first.w_ih_t
                    ).contiguous()  # [V, G*H]
                self._fused = layers
        return self._fused

"""A plain NumPy (float64) transcription of the article's LSTM and GRU, used as the oracle.

Written from shared/seed/lstm-gru-article.zh.md, one concatenated matrix per gate applied to
[h_{t-1}, x_t] (row vectors here, so `W·[h, x]` is `[h, x] @ W.T`):

    LSTM  f, i, o = σ(W·[h, x] + b);  C̃ = tanh(W_C·[h, x] + b_C)
          C_t = f∗C_{t-1} + i∗C̃;      h_t = o∗tanh(C_t)
    GRU   z, r = σ(W·[h, x] + b);     h̃ = tanh(W_h·[r∗h, x] + b_h)      (the article's z)
          h_t = (1−z)∗h_{t-1} + z∗h̃
    torch's reset-after GRU (torch's z):
          r, z = σ(W·[h, x] + b);     n = tanh(W_in·x + b_in + r∗(W_hn·h + b_hn))
          h_t = (1−z)∗n + z∗h_{t-1}

`*_from_torch` map torch's layout (weight_ih [G*H, I], weight_hh [G*H, H], bias_ih, bias_hh;
gates LSTM i,f,g,o and GRU r,z,n) to the article's per-gate matrices:
W_gate = [W_hh_gate | W_ih_gate], b_gate = b_ih_gate + b_hh_gate; for the article's GRU,
W_z = −W_z_ours and b_z = −b_z_ours (its z is 1 − ours).

Weights are read BY NAME from a state dict of arrays (`rnn.weight_ih_l0`, `embedding.weight`,
`input_proj.weight`, `head.weight`, ...), so `run_model` works on a model's state dict and on a
safetensors file alike:

    ref = run_model(numpy_state_dict(model), model.config, tokens, h0=h0, c0=c0)
    ref = run_model(load_safetensors(path), manifest, tokens)

No torch here: `numpy_state_dict` only duck-types tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

Array = np.ndarray
StateDict = Mapping[str, Array]


# ---- inputs: state dicts and configs ---------------------------------------------------------


def numpy_state_dict(tensors: Any) -> dict[str, Array]:
    """A state dict (or nn.Module) of tensors or arrays → {name: float64 array}."""
    if hasattr(tensors, "state_dict"):
        tensors = tensors.state_dict()
    out: dict[str, Array] = {}
    for name, value in tensors.items():
        if hasattr(value, "detach"):  # a torch tensor, without importing torch
            value = value.detach().cpu().double().numpy()
        out[name] = np.asarray(value, dtype=np.float64)
    return out


def load_safetensors(path: str | Path) -> dict[str, Array]:
    """A safetensors weights file → {name: float64 array}."""
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


@dataclass(frozen=True)
class RefConfig:
    cell: str  # "lstm" or "gru"
    num_layers: int
    hidden_size: int
    input_kind: str  # "tokens" or "features"
    head_kind: str  # "classification" or "regression" (the head is a Linear either way)
    reset_after: bool = True  # GRU only: True = torch's GRU, False = the article's


def as_ref_config(config: Any) -> RefConfig:
    """A ModelConfig, a Manifest, a manifest.json dict or a ModelConfig-like dict → RefConfig."""
    if isinstance(config, RefConfig):
        return config
    if hasattr(config, "to_config"):  # a Manifest
        config = config.to_config()
    if isinstance(config, Mapping):
        if "input" in config:  # manifest.json layout
            return RefConfig(
                cell=config["cell"],
                num_layers=int(config["num_layers"]),
                hidden_size=int(config["hidden_size"]),
                input_kind=config["input"]["kind"],
                head_kind=config["head"]["kind"],
                reset_after=bool(config.get("reset_after", True)),
            )
        fields = dict(config)
    else:
        fields = {name: getattr(config, name) for name in RefConfig.__dataclass_fields__}
    return RefConfig(
        cell=fields["cell"],
        num_layers=int(fields["num_layers"]),
        hidden_size=int(fields["hidden_size"]),
        input_kind=fields["input_kind"],
        head_kind=fields["head_kind"],
        reset_after=bool(fields.get("reset_after", True)),
    )


# ---- the article's per-gate weights and the mapping from torch's layout ----------------------


def sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + e^-x), without overflow


@dataclass(frozen=True)
class LSTMWeights:
    """The article's LSTM: one matrix [H, H+I] over [h_{t-1}, x_t] and one bias [H] per gate."""

    W_f: Array
    b_f: Array
    W_i: Array
    b_i: Array
    W_C: Array
    b_C: Array
    W_o: Array
    b_o: Array


@dataclass(frozen=True)
class ArticleGRUWeights:
    """The article's GRU with ITS z (z = 1 takes the candidate h̃)."""

    W_z: Array  # [H, H+I] over [h_{t-1}, x_t]
    b_z: Array
    W_r: Array  # [H, H+I] over [h_{t-1}, x_t]
    b_r: Array
    W_h: Array  # [H, H+I] over [r∗h_{t-1}, x_t]
    b_h: Array


@dataclass(frozen=True)
class TorchGRUWeights:
    """torch's reset-after GRU with torch's z (z = 1 keeps h_{t-1})."""

    W_r: Array  # [H, H+I] over [h_{t-1}, x_t]
    b_r: Array
    W_z: Array  # [H, H+I] over [h_{t-1}, x_t]
    b_z: Array
    W_in: Array  # [H, I]
    b_in: Array
    W_hn: Array  # [H, H]
    b_hn: Array


def _split(w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, gates: int) -> list[tuple]:
    """torch's stacked blocks → per gate (W_ih_g [H, I], W_hh_g [H, H], b_ih_g, b_hh_g)."""
    assert w_ih.shape[0] == w_hh.shape[0] == b_ih.shape[0] == b_hh.shape[0]
    assert w_ih.shape[0] % gates == 0 and w_hh.shape[1] * gates == w_hh.shape[0]
    return list(
        zip(
            np.split(w_ih, gates, axis=0),
            np.split(w_hh, gates, axis=0),
            np.split(b_ih, gates),
            np.split(b_hh, gates),
            strict=True,
        )
    )


def _article(gate: tuple) -> tuple[Array, Array]:
    """One torch gate → the article's W = [W_hh | W_ih] (over [h, x]) and b = b_ih + b_hh."""
    w_ih_g, w_hh_g, b_ih_g, b_hh_g = gate
    return np.concatenate([w_hh_g, w_ih_g], axis=1), b_ih_g + b_hh_g


def lstm_weights_from_torch(w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array) -> LSTMWeights:
    i, f, g, o = (_article(gate) for gate in _split(w_ih, w_hh, b_ih, b_hh, 4))  # torch: i,f,g,o
    return LSTMWeights(
        W_f=f[0], b_f=f[1], W_i=i[0], b_i=i[1], W_C=g[0], b_C=g[1], W_o=o[0], b_o=o[1]
    )


def article_gru_weights_from_torch(
    w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array
) -> ArticleGRUWeights:
    r, z, n = (_article(gate) for gate in _split(w_ih, w_hh, b_ih, b_hh, 3))  # torch: r,z,n
    return ArticleGRUWeights(
        W_z=-z[0],  # the article's z is 1 − ours: σ(−a) = 1 − σ(a)
        b_z=-z[1],
        W_r=r[0],
        b_r=r[1],
        W_h=n[0],  # [W_hn | W_in] over [r∗h, x]; b_h = b_in + b_hn
        b_h=n[1],
    )


def torch_gru_weights_from_torch(
    w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array
) -> TorchGRUWeights:
    r_gate, z_gate, n_gate = _split(w_ih, w_hh, b_ih, b_hh, 3)
    r, z = _article(r_gate), _article(z_gate)
    w_in, w_hn, b_in, b_hn = n_gate
    return TorchGRUWeights(
        W_r=r[0], b_r=r[1], W_z=z[0], b_z=z[1], W_in=w_in, b_in=b_in, W_hn=w_hn, b_hn=b_hn
    )


CellWeights = LSTMWeights | ArticleGRUWeights | TorchGRUWeights


def layer_weights(
    state_dict: StateDict, cell: str, reset_after: bool, k: int, prefix: str = "rnn."
) -> CellWeights:
    """Layer k's weights, read by name (`{prefix}weight_ih_l{k}`, ...), in the article's form."""
    tensors = [
        np.asarray(state_dict[f"{prefix}{name}_l{k}"], dtype=np.float64)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    if cell == "lstm":
        return lstm_weights_from_torch(*tensors)
    if reset_after:
        return torch_gru_weights_from_torch(*tensors)
    return article_gru_weights_from_torch(*tensors)


# ---- one step of each cell (x [..., I], h/c [..., H]) ----------------------------------------


def lstm_step(w: LSTMWeights, x: Array, h_prev: Array, c_prev: Array) -> tuple[Array, Array]:
    hx = np.concatenate([h_prev, x], axis=-1)  # [h_{t-1}, x_t]
    f = sigmoid(hx @ w.W_f.T + w.b_f)  # f_t = σ(W_f·[h_{t-1}, x_t] + b_f)
    i = sigmoid(hx @ w.W_i.T + w.b_i)  # i_t = σ(W_i·[h_{t-1}, x_t] + b_i)
    c_tilde = np.tanh(hx @ w.W_C.T + w.b_C)  # C̃_t = tanh(W_C·[h_{t-1}, x_t] + b_C)
    c = f * c_prev + i * c_tilde  # C_t = f_t∗C_{t-1} + i_t∗C̃_t
    o = sigmoid(hx @ w.W_o.T + w.b_o)  # o_t = σ(W_o·[h_{t-1}, x_t] + b_o)
    h = o * np.tanh(c)  # h_t = o_t∗tanh(C_t)
    return h, c


def article_gru_step(w: ArticleGRUWeights, x: Array, h_prev: Array) -> Array:
    hx = np.concatenate([h_prev, x], axis=-1)  # [h_{t-1}, x_t]
    z = sigmoid(hx @ w.W_z.T + w.b_z)  # z_t = σ(W_z·[h_{t-1}, x_t] + b_z)
    r = sigmoid(hx @ w.W_r.T + w.b_r)  # r_t = σ(W_r·[h_{t-1}, x_t] + b_r)
    rhx = np.concatenate([r * h_prev, x], axis=-1)  # [r_t∗h_{t-1}, x_t]
    h_tilde = np.tanh(rhx @ w.W_h.T + w.b_h)  # h̃_t = tanh(W_h·[r_t∗h_{t-1}, x_t] + b_h)
    return (1.0 - z) * h_prev + z * h_tilde  # h_t = (1−z_t)∗h_{t-1} + z_t∗h̃_t


def torch_gru_step(w: TorchGRUWeights, x: Array, h_prev: Array) -> Array:
    hx = np.concatenate([h_prev, x], axis=-1)  # [h_{t-1}, x_t]
    r = sigmoid(hx @ w.W_r.T + w.b_r)
    z = sigmoid(hx @ w.W_z.T + w.b_z)  # torch's z
    n = np.tanh(x @ w.W_in.T + w.b_in + r * (h_prev @ w.W_hn.T + w.b_hn))
    return (1.0 - z) * n + z * h_prev


def cell_step(
    w: CellWeights, x: Array, h_prev: Array, c_prev: Array | None = None
) -> tuple[Array, Array | None]:
    """Dispatch on the weights' type → (h_t, C_t or None)."""
    if isinstance(w, LSTMWeights):
        assert c_prev is not None, "an LSTM needs a cell state"
        return lstm_step(w, x, h_prev, c_prev)
    if isinstance(w, ArticleGRUWeights):
        return article_gru_step(w, x, h_prev), None
    return torch_gru_step(w, x, h_prev), None


# ---- stacked cells and the full model --------------------------------------------------------


class StackOutput(NamedTuple):
    outputs: Array  # [B, T, H] last layer's h at each position (NaN past a row's length)
    h: Array  # [L, B, H] after each row's last input
    c: Array | None  # [L, B, H] for an LSTM


def run_stack(
    layers: list[CellWeights],
    x: Array,
    h0: Array | None = None,
    c0: Array | None = None,
    lengths: Array | None = None,
) -> StackOutput:
    """Stacked cells over x [B, T, I] from h0/c0 [L, B, H] (zeros if None).

    With lengths [B], row b consumes only its first lengths[b] inputs (its state stops there).
    """
    x = np.asarray(x, dtype=np.float64)
    batch, steps = x.shape[:2]
    num_layers = len(layers)
    first = layers[0]
    is_lstm = isinstance(first, LSTMWeights)
    hidden = (first.b_f if isinstance(first, LSTMWeights) else first.b_r).shape[0]
    zeros = np.zeros((num_layers, batch, hidden))
    h = (zeros if h0 is None else np.asarray(h0, dtype=np.float64)).copy()
    c = (zeros if c0 is None else np.asarray(c0, dtype=np.float64)).copy() if is_lstm else None
    if lengths is None:
        lengths = np.full(batch, steps)
    lengths = np.asarray(lengths)
    assert lengths.shape == (batch,) and bool(((lengths >= 1) & (lengths <= steps)).all())
    outputs = np.full((batch, steps, hidden), np.nan)
    for t in range(steps):
        live = t < lengths  # [B]: rows still consuming input
        layer_in = x[live, t]
        for k, w in enumerate(layers):
            h_new, c_new = cell_step(w, layer_in, h[k, live], None if c is None else c[k, live])
            h[k, live] = h_new
            if c is not None:
                c[k, live] = c_new
            layer_in = h_new
        outputs[live, t] = layer_in
    return StackOutput(outputs, h, c)


def embed(state_dict: StateDict, input_kind: str, inputs: Array) -> Array:
    """tokens [B, T] (ints) → embedding rows; frames [B, T, D] → input_proj (Linear)."""
    if input_kind == "tokens":
        tokens = np.asarray(inputs)
        assert np.issubdtype(tokens.dtype, np.integer), "token inputs must be integers"
        return np.asarray(state_dict["embedding.weight"], dtype=np.float64)[tokens]
    frames = np.asarray(inputs, dtype=np.float64)
    w = np.asarray(state_dict["input_proj.weight"], dtype=np.float64)  # [E, D]
    b = np.asarray(state_dict["input_proj.bias"], dtype=np.float64)  # [E]
    return frames @ w.T + b


def head(state_dict: StateDict, h: Array) -> Array:
    w = np.asarray(state_dict["head.weight"], dtype=np.float64)  # [out, H]
    b = np.asarray(state_dict["head.bias"], dtype=np.float64)  # [out]
    return h @ w.T + b


class ModelOutput(NamedTuple):
    outputs: Array  # [B, T, out] head output at each position (NaN past a row's length)
    last: Array  # [B, out] head output after each row's last input
    h: Array  # [L, B, H] state after each row's last input
    c: Array | None  # [L, B, H] for an LSTM


def run_model(
    state_dict: StateDict,
    config: Any,
    inputs: Array,
    h0: Array | None = None,
    c0: Array | None = None,
    lengths: Array | None = None,
) -> ModelOutput:
    """Embedding / input_proj → stacked cell → head, in float64.

    state_dict: {name: array} with the served names; config: ModelConfig, Manifest, manifest
    dict or RefConfig; inputs: tokens [B, T] or frames [B, T, D]; h0/c0 [L, B, H] (zeros if
    None); lengths [B] (each row's inputs used, default all).
    """
    cfg = as_ref_config(config)
    layers = [
        layer_weights(state_dict, cfg.cell, cfg.reset_after, k) for k in range(cfg.num_layers)
    ]
    x = embed(state_dict, cfg.input_kind, inputs)  # [B, T, E]
    stack = run_stack(layers, x, h0, c0, lengths)
    outputs = head(state_dict, stack.outputs)  # [B, T, out]; NaN rows stay NaN
    steps = outputs.shape[1]
    last_idx = np.full(outputs.shape[0], steps) if lengths is None else np.asarray(lengths)
    last = outputs[np.arange(outputs.shape[0]), last_idx - 1]  # [B, out]
    return ModelOutput(outputs, last, stack.h, stack.c)

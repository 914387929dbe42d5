"""Our cells (service.models.cells, ArticleGRU) and torch's nn.LSTM / nn.GRU against the NumPy
transcription of the article's equations (tests/models/reference.py), to 1e-5.

Also proves the weight mapping is what is being tested: each plausible mistake (the article's z
without negation, gate order, [x, h] instead of [h, x], a dropped bias) moves the result far
outside the tolerance.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from service.models.article_gru import ArticleGRU
from service.models.cells import gru_cell, lstm_cell

from . import reference as ref
from .factories import ATOL, CELL_IDS, CELLS

IN, HID, BATCH = 12, 16, 5
LONG = 57  # steps in a "whole sequence" check


def _torch_layer(gates: int, width: int, gen: torch.Generator, scale: float = 0.5):
    """(w_ih [G*H, I], w_hh [G*H, H], b_ih, b_hh) float32, uniform(±scale)."""
    shapes = [(gates * HID, width), (gates * HID, HID), (gates * HID,), (gates * HID,)]
    return [(torch.rand(s, generator=gen) * 2 - 1) * scale for s in shapes]


def _ref_weights(cell: str, reset_after: bool, tensors) -> ref.CellWeights:
    arrays = [t.double().numpy() for t in tensors]
    if cell == "lstm":
        return ref.lstm_weights_from_torch(*arrays)
    if reset_after:
        return ref.torch_gru_weights_from_torch(*arrays)
    return ref.article_gru_weights_from_torch(*arrays)


def _our_step(cell: str, reset_after: bool, tensors, x, h, c):
    if cell == "lstm":
        return lstm_cell(x, h, c, *tensors)
    return gru_cell(x, h, *tensors, reset_after=reset_after), None


def _our_stack(cell, reset_after, layers, x, h0, c0):
    """Our cells stacked by hand over x [B, T, I] → (outputs [B, T, H], h [L, B, H], c)."""
    h = list(h0.unbind(0))
    c = list(c0.unbind(0)) if c0 is not None else [None] * len(layers)
    outs = []
    for t in range(x.shape[1]):
        layer_in = x[:, t]
        for k, tensors in enumerate(layers):
            h[k], c[k] = _our_step(cell, reset_after, tensors, layer_in, h[k], c[k])
            layer_in = h[k]
        outs.append(layer_in)
    return torch.stack(outs, 1), torch.stack(h), (torch.stack(c) if c0 is not None else None)


def _random_stack(cell: str, num_layers: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    gates = 4 if cell == "lstm" else 3
    layers = [_torch_layer(gates, IN if k == 0 else HID, gen) for k in range(num_layers)]
    x = torch.randn(BATCH, LONG, IN, generator=gen)
    h0 = torch.rand(num_layers, BATCH, HID, generator=gen) * 1.8 - 0.9
    c0 = torch.randn(num_layers, BATCH, HID, generator=gen) * 1.5 if cell == "lstm" else None
    return layers, x, h0, c0


# ---- single cells --------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_step_matches_reference(cell, reset_after, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = _torch_layer(4 if cell == "lstm" else 3, IN, gen)
    x = torch.randn(BATCH, IN, generator=gen)
    h = torch.rand(BATCH, HID, generator=gen) * 1.8 - 0.9  # nonzero state
    c = torch.randn(BATCH, HID, generator=gen) * 1.5

    h_t, c_t = _our_step(cell, reset_after, tensors, x, h, c)

    w = _ref_weights(cell, reset_after, tensors)
    rh, rc = ref.cell_step(w, x.double().numpy(), h.double().numpy(), c.double().numpy())
    np.testing.assert_allclose(h_t.numpy(), rh, rtol=0, atol=ATOL)
    if cell == "lstm":
        np.testing.assert_allclose(c_t.numpy(), rc, rtol=0, atol=ATOL)
    assert np.abs(rh - h.numpy()).max() > 0.05  # the step did move the state


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("num_layers", [2, 3])
def test_stacked_cells_over_long_sequence_match_reference(cell, reset_after, num_layers):
    layers, x, h0, c0 = _random_stack(cell, num_layers, seed=10 + num_layers)

    out, h, c = _our_stack(cell, reset_after, layers, x, h0, c0)

    ref_layers = [_ref_weights(cell, reset_after, t) for t in layers]
    expect = ref.run_stack(
        ref_layers, x.double().numpy(), h0.double().numpy(), None if c0 is None else c0.numpy()
    )
    np.testing.assert_allclose(out.numpy(), expect.outputs, rtol=0, atol=ATOL)
    np.testing.assert_allclose(h.numpy(), expect.h, rtol=0, atol=ATOL)
    if cell == "lstm":
        np.testing.assert_allclose(c.numpy(), expect.c, rtol=0, atol=ATOL)


# ---- torch's own modules prove the torch-layout mapping ------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_torch_modules_match_reference(cell, num_layers):
    torch.manual_seed(num_layers)
    module_cls = nn.LSTM if cell == "lstm" else nn.GRU
    module = module_cls(IN, HID, num_layers, batch_first=True)
    gen = torch.Generator().manual_seed(20 + num_layers)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5, generator=gen)
    _, x, h0, c0 = _random_stack(cell, num_layers, seed=30 + num_layers)

    with torch.no_grad():
        if cell == "lstm":
            out, (h_n, c_n) = module(x, (h0, c0))
        else:
            out, h_n = module(x, h0)

    sd = ref.numpy_state_dict(module)  # torch's own names: weight_ih_l0, ... (no prefix)
    layers = [ref.layer_weights(sd, cell, True, k, prefix="") for k in range(num_layers)]
    expect = ref.run_stack(layers, x.numpy(), h0.numpy(), None if c0 is None else c0.numpy())
    np.testing.assert_allclose(out.numpy(), expect.outputs, rtol=0, atol=ATOL)
    np.testing.assert_allclose(h_n.numpy(), expect.h, rtol=0, atol=ATOL)
    if cell == "lstm":
        np.testing.assert_allclose(c_n.numpy(), expect.c, rtol=0, atol=ATOL)


# ---- the article's GRU module --------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [2, 3])
def test_article_gru_module_matches_reference(num_layers):
    torch.manual_seed(40 + num_layers)
    module = ArticleGRU(IN, HID, num_layers)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    _, x, h0, _ = _random_stack("gru", num_layers, seed=50 + num_layers)
    lengths = np.array([LONG, 1, 23, LONG - 1, 50])

    with torch.no_grad():
        out, h_n = module(x, h0)
        out_l, h_n_l = module(x, h0, torch.from_numpy(lengths))

    sd = ref.numpy_state_dict(module)
    layers = [ref.layer_weights(sd, "gru", False, k, prefix="") for k in range(num_layers)]
    expect = ref.run_stack(layers, x.numpy(), h0.numpy())
    np.testing.assert_allclose(out.numpy(), expect.outputs, rtol=0, atol=ATOL)
    np.testing.assert_allclose(h_n.numpy(), expect.h, rtol=0, atol=ATOL)

    expect_l = ref.run_stack(layers, x.numpy(), h0.numpy(), lengths=lengths)
    np.testing.assert_allclose(h_n_l.numpy(), expect_l.h, rtol=0, atol=ATOL)
    valid = ~np.isnan(expect_l.outputs)
    np.testing.assert_allclose(out_l.numpy()[valid], expect_l.outputs[valid], rtol=0, atol=ATOL)


# ---- the mapping is what is tested ---------------------------------------------------------


def _swap_concat(w: np.ndarray) -> np.ndarray:
    """[W_hh | W_ih] → [W_ih | W_hh]: the matrix one gets by concatenating in [x, h] order."""
    return np.concatenate([w[:, HID:], w[:, :HID]], axis=1)


def _wrong_mappings(cell: str, reset_after: bool, w: ref.CellWeights) -> dict[str, ref.CellWeights]:
    rep = dataclasses.replace
    if isinstance(w, ref.LSTMWeights):
        return {
            "gate order i,f swapped": rep(w, W_f=w.W_i, b_f=w.b_i, W_i=w.W_f, b_i=w.b_f),
            "gate order g,o swapped": rep(w, W_C=w.W_o, b_C=w.b_o, W_o=w.W_C, b_o=w.b_C),
            "[x, h] concat order": rep(
                w, **{n: _swap_concat(getattr(w, n)) for n in ("W_f", "W_i", "W_C", "W_o")}
            ),
        }
    if isinstance(w, ref.ArticleGRUWeights):
        return {
            "torch's z (not negated)": rep(w, W_z=-w.W_z, b_z=-w.b_z),
            "only W_z negated": rep(w, W_z=-w.W_z),
            "gate order r,z swapped": rep(w, W_z=-w.W_r, b_z=-w.b_r, W_r=-w.W_z, b_r=-w.b_z),
            "[x, h] concat order": rep(
                w, **{n: _swap_concat(getattr(w, n)) for n in ("W_z", "W_r", "W_h")}
            ),
        }
    return {
        "article's z (negated)": rep(w, W_z=-w.W_z, b_z=-w.b_z),
        "gate order r,z swapped": rep(w, W_z=w.W_r, b_z=w.b_r, W_r=w.W_z, b_r=w.b_z),
        "b_hn outside r (reset-before bias)": rep(w, b_in=w.b_in + w.b_hn, b_hn=0 * w.b_hn),
    }


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_wrong_mappings_are_caught(cell, reset_after):
    """The correct mapping agrees to 1e-5; every plausible mistake is off by far more."""
    layers, x, h0, c0 = _random_stack(cell, 2, seed=60)
    out, _, _ = _our_stack(cell, reset_after, layers, x, h0, c0)
    right = [_ref_weights(cell, reset_after, t) for t in layers]
    args = (x.numpy(), h0.numpy(), None if c0 is None else c0.numpy())
    assert np.abs(ref.run_stack(right, *args).outputs - out.numpy()).max() < ATOL

    for mistake, wrong_first in _wrong_mappings(cell, reset_after, right[0]).items():
        wrong = ref.run_stack([wrong_first, right[1]], *args).outputs
        diff = np.abs(wrong - out.numpy()).max()
        assert diff > 1e-2, f"{mistake} was not caught (max diff {diff:.2e})"


def test_reset_after_and_article_gru_differ_on_same_weights():
    layers, x, h0, _ = _random_stack("gru", 2, seed=70)
    after, _, _ = _our_stack("gru", True, layers, x, h0, None)
    before, _, _ = _our_stack("gru", False, layers, x, h0, None)
    assert np.abs(after.numpy() - before.numpy()).max() > 1e-2


# ---- the reference itself, against the article's words -------------------------------------


def test_article_gru_z_convention():
    """Article: z = 1 takes the candidate h̃; ours (torch's): z = 1 keeps h_{t-1}."""
    gen = torch.Generator().manual_seed(80)
    w_ih, w_hh, b_ih, b_hh = _torch_layer(3, IN, gen)
    w_ih[HID : 2 * HID] = 0  # z's weights off: z is decided by its bias alone
    w_hh[HID : 2 * HID] = 0
    b_hh[HID : 2 * HID] = 0
    x = torch.randn(BATCH, IN, generator=gen)
    h = torch.rand(BATCH, HID, generator=gen) * 1.8 - 0.9

    for mode in (True, False):
        b_ih[HID : 2 * HID] = 40.0  # our z ≈ 1: keep the old state
        kept = gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=mode)
        np.testing.assert_allclose(kept.numpy(), h.numpy(), atol=1e-6)

    b_ih[HID : 2 * HID] = 40.0
    w = ref.article_gru_weights_from_torch(*(t.double().numpy() for t in (w_ih, w_hh, b_ih, b_hh)))
    assert (w.b_z < -39).all()  # the article's z ≈ 0 ...
    np.testing.assert_allclose(ref.article_gru_step(w, x.numpy(), h.numpy()), h.numpy(), atol=1e-6)
    # ... and the article's z ≈ 1 gives exactly its candidate h̃ = tanh(W_h·[r∗h, x] + b_h).
    w1 = dataclasses.replace(w, b_z=-w.b_z)
    hx = np.concatenate([h.numpy(), x.numpy()], axis=1)
    r = ref.sigmoid(hx @ w.W_r.T + w.b_r)
    h_tilde = np.tanh(np.concatenate([r * h.numpy(), x.numpy()], axis=1) @ w.W_h.T + w.b_h)
    np.testing.assert_allclose(ref.article_gru_step(w1, x.numpy(), h.numpy()), h_tilde, atol=1e-12)


def test_reference_scalar_cells_by_hand():
    """H = I = 1, written out with math.* straight from the article's formulas."""

    def s(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    h, x, c = 0.3, -0.7, 0.5
    # LSTM: each gate's W = [w_h, w_x] over [h_{t-1}, x_t].
    wf, bf = (0.4, -0.2), 0.1
    wi, bi = (-0.3, 0.8), 0.2
    wc, bc = (0.5, 0.6), -0.1
    wo, bo = (0.9, -0.4), 0.05
    f = s(wf[0] * h + wf[1] * x + bf)
    i = s(wi[0] * h + wi[1] * x + bi)
    c_tilde = math.tanh(wc[0] * h + wc[1] * x + bc)
    c_t = f * c + i * c_tilde
    h_t = s(wo[0] * h + wo[1] * x + bo) * math.tanh(c_t)
    lw = ref.LSTMWeights(
        W_f=np.array([wf]),
        b_f=np.array([bf]),
        W_i=np.array([wi]),
        b_i=np.array([bi]),
        W_C=np.array([wc]),
        b_C=np.array([bc]),
        W_o=np.array([wo]),
        b_o=np.array([bo]),
    )
    rh, rc = ref.lstm_step(lw, np.array([x]), np.array([h]), np.array([c]))
    assert rh[0] == pytest.approx(h_t, abs=1e-14)
    assert rc[0] == pytest.approx(c_t, abs=1e-14)

    # Article GRU.
    wz, bz = (0.7, -0.5), 0.3
    wr, br = (-0.6, 0.2), 0.1
    wh, bh = (1.1, 0.4), -0.2  # W_h over [r∗h_{t-1}, x_t]
    z = s(wz[0] * h + wz[1] * x + bz)
    r = s(wr[0] * h + wr[1] * x + br)
    h_tilde = math.tanh(wh[0] * (r * h) + wh[1] * x + bh)
    expect = (1 - z) * h + z * h_tilde
    gw = ref.ArticleGRUWeights(
        W_z=np.array([wz]),
        b_z=np.array([bz]),
        W_r=np.array([wr]),
        b_r=np.array([br]),
        W_h=np.array([wh]),
        b_h=np.array([bh]),
    )
    assert ref.article_gru_step(gw, np.array([x]), np.array([h]))[0] == pytest.approx(
        expect, abs=1e-14
    )

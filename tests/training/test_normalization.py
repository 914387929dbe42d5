"""Folding standardisation into input_proj and head changes the units, not the predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.models import CellKind, ModelConfig, SequenceModel
from service.training.normalization import Standardizer, fold_normalization


def _model(cell: CellKind, reset_after: bool, dim: int, out: int) -> SequenceModel:
    torch.manual_seed(0)
    config = ModelConfig(
        cell=cell, num_layers=2, hidden_size=8, input_kind="features", input_dim=dim,
        embed_dim=5, head_kind="regression", output_dim=out, reset_after=reset_after,
    )  # fmt: skip
    return SequenceModel(config)


@pytest.mark.parametrize(("cell", "reset_after"), [("gru", False), ("gru", True), ("lstm", True)])
def test_folded_model_on_raw_units_matches_standardised_model(
    cell: CellKind, reset_after: bool
) -> None:
    rng = np.random.default_rng(1)
    raw = rng.normal(loc=[340.0, -5.0, 0.1], scale=[12.0, 2.0, 0.01], size=(2, 20, 3))  # [B, T, D]
    inputs = Standardizer.fit(raw.reshape(-1, 3))
    outputs = Standardizer(mean=np.array([350.0, 1.0]), std=np.array([13.0, 0.5]))
    model = _model(cell, reset_after, dim=3, out=2)
    with torch.no_grad():
        scaled_in = torch.tensor(inputs.apply(raw), dtype=torch.float32)
        expected = outputs.invert(model(scaled_in)[0].double().numpy())  # [B, T, O] raw units
        fold_normalization(model, inputs, outputs)
        folded = model(torch.tensor(raw, dtype=torch.float32))[0].double().numpy()
        stepped, state = [], model.zero_state(2)
        for t in range(raw.shape[1]):  # the server's per-step path sees the same weights
            out, state = model.step(torch.tensor(raw[:, t], dtype=torch.float32), state)
            stepped.append(out.double().numpy())
    assert np.abs(expected).max() > 100  # really in raw units
    np.testing.assert_allclose(folded, expected, rtol=0, atol=2e-3)
    np.testing.assert_allclose(np.stack(stepped, axis=1), expected, rtol=0, atol=2e-3)


def test_standardizer_round_trips_and_tolerates_a_constant_column() -> None:
    values = np.array([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]])
    scale = Standardizer.fit(values)
    assert scale.std[1] == 1.0
    np.testing.assert_allclose(scale.apply(values).mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(scale.invert(scale.apply(values)), values)

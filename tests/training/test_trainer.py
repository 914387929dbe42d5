"""The shared step loop: schedule shape, seeding, and that it really optimises."""

from __future__ import annotations

import itertools

import pytest
import torch

from service.models import ModelConfig, SequenceModel
from service.training.trainer import (
    FINAL_LR_FRACTION,
    BaselineShortfall,
    TrainResult,
    baseline_shortfalls,
    export_state_dict,
    learning_rate,
    run_steps,
    seed_everything,
)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    steps, peak = 200, 1e-2
    rates = [learning_rate(s, steps, peak) for s in range(steps)]
    top = rates.index(max(rates))
    assert 0 < top < steps // 4
    assert max(rates) == pytest.approx(peak)
    assert all(a <= b for a, b in itertools.pairwise(rates[: top + 1]))
    assert all(a >= b for a, b in itertools.pairwise(rates[top:]))
    assert rates[-1] == pytest.approx(peak * FINAL_LR_FRACTION, rel=0.01)


def test_run_steps_fits_a_constant_target_and_reports_the_tail_loss() -> None:
    seed_everything(0)
    config = ModelConfig(
        cell="gru", num_layers=1, hidden_size=4, input_kind="features", input_dim=1,
        embed_dim=2, head_kind="regression", output_dim=1,
    )  # fmt: skip
    model = SequenceModel(config)
    x = torch.zeros(2, 3, 1)
    target = torch.full((2, 3, 1), 0.7)

    def loss(step: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x)[0], target)

    first = float(loss(0).detach())
    final = run_steps(model, loss, steps=150, lr=5e-2, progress=False)
    assert final < first / 10
    assert not model.training  # left in eval mode


def test_seed_everything_repeats_weights_and_data_draws() -> None:
    config = ModelConfig(
        cell="lstm", num_layers=1, hidden_size=3, input_kind="tokens", input_dim=256,
        embed_dim=2, head_kind="classification", output_dim=256,
    )  # fmt: skip
    draws = []
    weights = []
    for seed in (5, 5, 6):
        rng = seed_everything(seed)
        weights.append(export_state_dict(SequenceModel(config)))
        draws.append(rng.integers(0, 1000, size=4).tolist())
    assert draws[0] == draws[1] != draws[2]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["head.weight"], weights[2]["head.weight"])


def _result(validation: dict[str, float], baselines: dict[str, float]) -> TrainResult:
    config = ModelConfig(
        cell="gru", num_layers=1, hidden_size=2, input_kind="features", input_dim=1,
        embed_dim=1, head_kind="regression", output_dim=1,
    )  # fmt: skip
    return TrainResult(config, {}, "d", "data", 0.0, validation, baselines)


def test_baseline_shortfalls_lists_every_figure_not_below_its_baseline() -> None:
    better = _result({"mae": 0.5, "rmse": 0.7}, {"mae": 1.0, "rmse": 1.2})
    mixed = _result({"mae": 0.5, "rmse": 1.2, "extra": 9.0}, {"mae": 1.0, "rmse": 1.2})
    diverged = _result({"bits_per_byte": float("nan")}, {"bits_per_byte": 4.7})

    assert baseline_shortfalls(better) == []
    # A tie learned nothing; a figure with no baseline is not compared.
    assert baseline_shortfalls(mixed) == [BaselineShortfall("rmse", 1.2, 1.2)]
    (nan,) = baseline_shortfalls(diverged)
    assert nan.metric == "bits_per_byte" and nan.baseline == 4.7

"""The CO2 series: gaps filled, time split, naive baseline on exactly the validation targets."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.datasets import co2

from service.training.co2_series import load_co2_series, naive_last_value_mae


def test_series_is_complete_and_keeps_every_measurement() -> None:
    raw = co2.load_pandas().data["co2"]
    series = load_co2_series()
    assert series.values.size == raw.size
    assert not np.isnan(series.values).any()
    measured = ~raw.isna().to_numpy()
    assert np.array_equal(series.values[measured], raw.to_numpy()[measured])
    assert series.missing_filled == int((~measured).sum()) > 0
    gap = int(np.flatnonzero(~measured)[0])  # a filled week lies between its neighbours
    low, high = sorted((series.values[gap - 1], series.values[gap + 1]))
    assert low <= series.values[gap] <= high


def test_time_split_puts_validation_after_train() -> None:
    series = load_co2_series(validation_fraction=0.25)
    assert series.split == round(series.values.size * 0.75)
    assert series.weeks[series.split - 1] < series.weeks[series.split]
    assert np.array_equal(series.train, series.values[: series.split])
    last, targets = series.validation_pairs()
    assert targets.size == series.values.size - series.split
    assert np.array_equal(last[1:], targets[:-1])  # each input is the previous target
    assert last[0] == series.train[-1]


def test_naive_baseline_scores_last_value_forecasts() -> None:
    series = load_co2_series()
    values, split = series.values, series.split
    expected = np.mean([abs(values[t] - values[t - 1]) for t in range(split, values.size)])
    assert naive_last_value_mae(series) == pytest.approx(expected)

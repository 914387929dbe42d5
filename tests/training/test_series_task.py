"""CO2 forecaster training: windows from before the split only, raw units out, seeded runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from service.models import SequenceModel
from service.training.co2_series import Co2Series, load_co2_series
from service.training.series_task import (
    FRAME_DIM,
    WindowSampler,
    series_model_config,
    stream_forecasts,
    train_series,
    validation_errors,
)
from service.training.trainer import TrainOptions

TINY = TrainOptions(
    cell="gru", reset_after=False, num_layers=1, hidden_size=6, embed_dim=3, steps=4,
    batch_size=4, seq_len=12, lr=1e-2, seed=11,
)  # fmt: skip


@pytest.fixture(scope="module")
def series() -> Co2Series:
    return load_co2_series()


def test_windows_are_training_slices_each_shifted_by_one_offset(series: Co2Series) -> None:
    frames = series.frames()[: series.split]
    plain = WindowSampler(frames, 8, 10, np.random.default_rng(0), shift_ppm=0.0)
    shifted = WindowSampler(frames, 8, 10, np.random.default_rng(0), shift_ppm=30.0)
    starts = set()
    for _ in range(20):
        inputs, targets = plain.next()
        assert inputs.shape == (8, 10, FRAME_DIM) and targets.shape == (8, 10)
        for window, target in zip(inputs, targets, strict=True):
            matches = [
                s for s in np.flatnonzero(frames[:, 0] == window[0, 0])
                if np.array_equal(frames[s : s + 10], window)
            ]  # fmt: skip
            assert len(matches) == 1, "a window is exactly one slice of the training weeks"
            start = int(matches[0])
            starts.add(start)
            np.testing.assert_array_equal(target, frames[start + 1 : start + 11, 0])
        moved, moved_targets = shifted.next()
        offset = moved[:, :, 0] - inputs[:, :, 0]  # [8, 10]: one offset per window
        assert np.allclose(offset, offset[:, :1]) and np.abs(offset).max() <= 30.0
        assert np.abs(offset).max() > 1.0
        assert np.allclose(moved_targets - targets, offset[:, :1])
        np.testing.assert_array_equal(moved[:, :, 1:], inputs[:, :, 1:])  # phase untouched
    assert len(starts) > 100  # windows come from all over the training weeks


def test_stream_forecasts_match_the_servers_step_path(series: Co2Series) -> None:
    torch.manual_seed(0)
    model = SequenceModel(series_model_config(TINY))
    frames = series.frames()[:30]
    streamed = stream_forecasts(model, frames)
    state, stepped = model.zero_state(1), []
    for t in range(frames.shape[0]):
        out, state = model.step(torch.tensor(frames[t : t + 1], dtype=torch.float32), state)
        stepped.append(float(out[0, 0]))
    np.testing.assert_allclose(streamed, stepped, rtol=1e-5, atol=1e-4)


def test_tiny_run_is_repeatable_and_publishes_raw_units(series: Co2Series) -> None:
    first = train_series(TINY, series, progress=False)
    second = train_series(TINY, series, progress=False)
    other = train_series(dataclasses.replace(TINY, seed=12), series, progress=False)
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert not torch.equal(first.state_dict["head.bias"], other.state_dict["head.bias"])
    assert first.validation == second.validation
    assert first.validation.keys() == first.baselines.keys() == {"mae_ppm", "rmse_ppm"}
    # A fresh model built from the published weights alone reproduces the reported figures.
    model = SequenceModel(first.config)
    model.load_state_dict(first.state_dict)
    assert validation_errors(model, series) == pytest.approx(first.validation)
    assert first.config.reset_after is False and first.config.input_dim == FRAME_DIM


def test_validation_weeks_never_reach_the_weights(series: Co2Series) -> None:
    altered = dataclasses.replace(series, values=series.values.copy())
    altered.values[series.split :] += 50.0  # a different future must not change training
    trained = train_series(TINY, series, progress=False)
    trained_altered = train_series(TINY, altered, progress=False)
    for key, tensor in trained.state_dict.items():
        assert torch.equal(tensor, trained_altered.state_dict[key]), key
    assert trained.validation != trained_altered.validation  # but it is scored on them


def test_training_beats_an_untrained_model(series: Co2Series) -> None:
    options = dataclasses.replace(TINY, hidden_size=16, steps=40, seq_len=52, batch_size=16)
    torch.manual_seed(options.seed)
    untrained = SequenceModel(series_model_config(options))
    trained = train_series(options, series, progress=False)
    # The untrained model emits standardised-scale numbers, far from ~360 ppm.
    assert trained.validation["mae_ppm"] < validation_errors(untrained, series)["mae_ppm"] / 5

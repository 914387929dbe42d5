"""Train a GRU that forecasts next week's CO2 from weekly feature frames.

Training draws random windows (seeded) from the weeks before the time split and works in
standardised units, with statistics from those weeks only. Each window's CO2 (input and target)
is also shifted by a random offset in ppm: the series climbs out of the range seen in training,
and the shift teaches the model that the forecast moves with the current level rather than
with the absolute number. Without it the validation error is several times the naive one.

Validation streams the whole series through the model from a zero state, as a session would,
and scores the forecasts whose targets lie after the split (MAE and RMSE in ppm); the baseline
is the naive last-value forecast on the same targets. Before publishing, the standardisation is
folded into input_proj and head, so the served model reads raw frames and writes raw ppm.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.errors import InvalidArgument
from service.models import ModelConfig, SequenceModel
from service.training.co2_series import (
    FRAME_FEATURES,
    Co2Series,
    load_co2_series,
    naive_last_value_mae,
)
from service.training.normalization import Standardizer, fold_normalization
from service.training.trainer import (
    TrainOptions,
    TrainResult,
    export_state_dict,
    run_steps,
    seed_everything,
)

FRAME_DIM = len(FRAME_FEATURES)
# Each training window's CO2 is shifted by a uniform offset in [-SHIFT_PPM, +SHIFT_PPM].
SHIFT_PPM = 30.0


def series_model_config(options: TrainOptions) -> ModelConfig:
    return ModelConfig(
        cell=options.cell,
        num_layers=options.num_layers,
        hidden_size=options.hidden_size,
        input_kind="features",
        input_dim=FRAME_DIM,
        embed_dim=options.embed_dim,
        head_kind="regression",
        output_dim=1,
        reset_after=options.reset_after,
    )


class WindowSampler:
    """Random (seeded) windows of the training weeks, each with its CO2 shifted at random."""

    def __init__(
        self,
        frames: np.ndarray,
        batch: int,
        seq_len: int,
        rng: np.random.Generator,
        shift_ppm: float = SHIFT_PPM,
    ) -> None:
        """frames [N, D]: training weeks only (column 0 is CO2, also the target)."""
        if frames.shape[0] < seq_len + 1:
            raise InvalidArgument(
                f"{frames.shape[0]} training weeks cannot fill a window of {seq_len + 1}"
            )
        self.frames = frames
        self.batch = batch
        self.seq_len = seq_len
        self.rng = rng
        self.shift_ppm = shift_ppm

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """→ (inputs [B, T, D], targets [B, T]) in raw units; targets are CO2 one week on."""
        starts = self.rng.integers(0, self.frames.shape[0] - self.seq_len, size=self.batch)
        index = starts[:, None] + np.arange(self.seq_len + 1)  # [B, T+1]
        windows = self.frames[index]  # [B, T+1, D], a copy
        shift = self.rng.uniform(-self.shift_ppm, self.shift_ppm, size=(self.batch, 1))  # [B, 1]
        windows[:, :, 0] += shift
        return windows[:, :-1], windows[:, 1:, 0]


@torch.no_grad()
def stream_forecasts(model: SequenceModel, frames: np.ndarray) -> np.ndarray:
    """Feed raw `frames` [N, D] from a zero state → forecasts [N]: forecast[t] is for t+1."""
    model.eval()
    x = torch.tensor(frames, dtype=torch.float32).unsqueeze(0)  # [1, N, D]
    out, _ = model(x)  # [1, N, 1]
    return out.view(-1).double().numpy()


def validation_errors(model: SequenceModel, series: Co2Series) -> dict[str, float]:
    """MAE and RMSE (ppm) of the raw-unit `model` on the validation targets."""
    forecasts = stream_forecasts(model, series.frames()[:-1])  # [N-1]
    _, targets = series.validation_pairs()
    errors = forecasts[series.split - 1 :] - targets
    return {"mae_ppm": float(np.abs(errors).mean()), "rmse_ppm": float(np.sqrt((errors**2).mean()))}


def train_series(
    options: TrainOptions, series: Co2Series | None = None, progress: bool = True
) -> TrainResult:
    series = load_co2_series() if series is None else series
    rng = seed_everything(options.seed)
    config = series_model_config(options)
    model = SequenceModel(config)
    train_frames = series.frames()[: series.split]  # [S, D]: nothing after the split
    inputs_scale = Standardizer.fit(train_frames)
    target_scale = Standardizer.fit(series.train)
    sampler = WindowSampler(train_frames, options.batch_size, options.seq_len, rng)

    def step_loss(step: int) -> Tensor:
        inputs, targets = sampler.next()
        x = torch.tensor(inputs_scale.apply(inputs), dtype=torch.float32)  # [B, T, D]
        y = torch.tensor(target_scale.apply(targets[..., None]), dtype=torch.float32)  # [B, T, 1]
        out, _ = model(x)  # [B, T, 1]
        return F.mse_loss(out, y)

    final_loss = run_steps(model, step_loss, options.steps, options.lr, progress, unit="mse")
    fold_normalization(model, inputs_scale, target_scale)
    last, targets = series.validation_pairs()
    naive_rmse = float(np.sqrt(((targets - last) ** 2).mean()))
    arch = f"{options.num_layers}x{options.hidden_size} {options.cell.upper()}"
    return TrainResult(
        config=config,
        state_dict=export_state_dict(model),
        description=(
            f"{arch} (reset_after={options.reset_after}) forecasting next week's Mauna Loa CO2 "
            "from weekly frames [co2 ppm, sin, cos of the year phase]; raw units in and out "
            "(standardisation folded into input_proj and head). Validation: MAE/RMSE in ppm "
            f"on the last {series.values.size - series.split} weeks, streamed from a zero "
            "state; baseline: naive last-value forecast. final_loss: train MSE in standardised "
            "units, mean of the last 10% of steps."
        ),
        data=f"{series.describe()}; training windows of {options.seq_len} weeks, CO2 shifted "
        f"by U(-{SHIFT_PPM:g}, {SHIFT_PPM:g}) ppm per window",
        final_loss=final_loss,
        validation=validation_errors(model, series),
        baselines={"mae_ppm": naive_last_value_mae(series), "rmse_ppm": naive_rmse},
    )

"""The feature-frame data set: weekly atmospheric CO2 at Mauna Loa (1958-2001).

Shipped inside statsmodels (`statsmodels.datasets.co2`), so it is real data available offline.
A frame is three floats: the week's CO2 in ppm, and the sine and cosine of its phase in the
year (day of year / 365.25; calendar features a client can compute from the date). The phase
lets a recurrent model place the seasonal cycle without having to count weeks: a linear fit of
the weekly change on these two features alone cuts the naive forecast's MAE by about 15%.
The target is next week's CO2. Split in time: the last `validation_fraction` of the weeks are
validation targets, and training only ever sees values before the split, so nothing about the
validation period leaks into the weights or into the normalisation statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.errors import FailedPrecondition

DEFAULT_VALIDATION_FRACTION = 0.2
FRAME_FEATURES = ("co2_ppm", "sin_year_phase", "cos_year_phase")
DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class Co2Series:
    values: np.ndarray  # [N] float64 ppm, weekly, gaps filled
    weeks: np.ndarray  # [N] datetime64[D]: the Saturday each value belongs to
    split: int  # values[split:] are validation targets; training uses values[:split] only
    missing_filled: int  # how many weeks had no measurement

    @property
    def train(self) -> np.ndarray:
        return self.values[: self.split]

    def frames(self) -> np.ndarray:
        """[N, 3]: FRAME_FEATURES for every week."""
        return np.column_stack([self.values, *year_phase_features(self.weeks)])

    def validation_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(last seen values, targets) for every validation target: inputs end at t, target t+1."""
        return self.values[self.split - 1 : -1], self.values[self.split :]

    def describe(self) -> str:
        first, cut, last = self.weeks[0], self.weeks[self.split], self.weeks[-1]
        return (
            "statsmodels.datasets.co2 (Keeling & Whorf 2004, SIO flask samples, Mauna Loa, "
            f"weekly ppm, {first}..{last}, {self.values.size} weeks; {self.missing_filled} "
            "missing weeks filled by linear interpolation in time); frame = [co2 ppm, "
            "sin(2π·doy/365.25), cos(2π·doy/365.25)] with doy the week's 0-based day of year, "
            f"target = next week's co2; time split: train targets before {cut} "
            f"({self.split} weeks), validation targets {cut}..{last} "
            f"({self.values.size - self.split} weeks)"
        )


def load_co2_series(validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> Co2Series:
    if not 0.0 < validation_fraction < 1.0:
        raise FailedPrecondition(
            f"validation_fraction must be in (0, 1), got {validation_fraction}"
        )
    try:
        from statsmodels.datasets import co2  # optional dependency: the `train` extra
    except ImportError as exc:
        raise FailedPrecondition(
            "the series task needs statsmodels: pip install 'seqserve[train]'"
        ) from exc
    frame = co2.load_pandas().data
    column = frame["co2"]
    missing = int(column.isna().sum())
    filled = column.interpolate(method="time", limit_direction="both")
    values = filled.to_numpy(dtype=np.float64)
    weeks = frame.index.to_numpy().astype("datetime64[D]")
    split = round(values.size * (1.0 - validation_fraction))
    return Co2Series(values=values, weeks=weeks, split=split, missing_filled=missing)


def year_phase_features(weeks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weeks [N] datetime64 → (sin, cos) of 2π·(0-based day of year)/365.25, each [N]."""
    day_of_year = (weeks.astype("datetime64[D]") - weeks.astype("datetime64[Y]")).astype(np.int64)
    angle = 2.0 * np.pi * day_of_year / DAYS_PER_YEAR
    return np.sin(angle), np.cos(angle)


def naive_last_value_mae(series: Co2Series) -> float:
    """MAE (ppm) of predicting each validation target with the week before it."""
    last, target = series.validation_pairs()
    return float(np.abs(target - last).mean())

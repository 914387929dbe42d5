"""A load test's measured window in buckets: rates, errors, drops and latency percentiles over
time (the report's `timeline`, the plot's time panels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.loadtest.recorder import LoadRecorder, Samples


@dataclass(frozen=True)
class TimelinePoint:
    """One bucket of the measured window; rates are per second over the bucket."""

    t: float  # bucket start, seconds since the window opened
    tokens_in_per_second: float
    tokens_generated_per_second: float
    messages_per_second: float
    errors: int
    step_p50: float | None
    step_p99: float | None
    ttft_p50: float | None = None  # time to first token, of generations answered in the bucket
    ttft_p99: float | None = None
    dropped: int = 0  # open loop: requests due in the bucket and never sent


def timeline_bucket_seconds(window_seconds: float) -> float:
    """One-second buckets, finer for short runs so a plot still has ~20 points."""
    return 1.0 if window_seconds >= 20 else max(0.05, window_seconds / 20)


def build_timeline(recorder: LoadRecorder) -> list[TimelinePoint]:
    start, span = recorder.window_start, recorder.window_seconds
    width = timeline_bucket_seconds(span)
    n = max(1, int(np.ceil(span / width - 1e-9)))

    def bucket_of(at: Any) -> Any:
        idx = ((np.asarray(at, dtype=np.float64) - start) / width).astype(np.int64)
        return np.clip(idx, 0, n - 1)

    def counts(at: Any, weights: Any = None) -> Any:
        return np.bincount(bucket_of(at), weights=weights, minlength=n)[:n]

    tin = counts(recorder.tokens_in.at, np.asarray(recorder.tokens_in.seconds))
    tgen = counts(recorder.tokens_generated)
    msgs = counts(recorder.messages)
    errs = counts(recorder.error_at)
    drops = counts(recorder.dropped)
    step_p50, step_p99 = _bucket_percentiles(recorder.step_latency, bucket_of, n)
    ttft_p50, ttft_p99 = _bucket_percentiles(recorder.time_to_first_token, bucket_of, n)
    points = []
    for i in range(n):
        # The last bucket may be partial: rates use its real width.
        w = min(width, span - i * width) if i == n - 1 else width
        w = max(w, 1e-9)
        points.append(
            TimelinePoint(
                t=i * width,
                tokens_in_per_second=float(tin[i]) / w,
                tokens_generated_per_second=float(tgen[i]) / w,
                messages_per_second=float(msgs[i]) / w,
                errors=int(errs[i]),
                step_p50=step_p50[i],
                step_p99=step_p99[i],
                ttft_p50=ttft_p50[i],
                ttft_p99=ttft_p99[i],
                dropped=int(drops[i]),
            )
        )
    return points


def _bucket_percentiles(
    samples: Samples, bucket_of: Any, n: int
) -> tuple[list[float | None], list[float | None]]:
    p50: list[float | None] = [None] * n
    p99: list[float | None] = [None] * n
    if not len(samples):
        return p50, p99
    buckets = bucket_of(samples.at)
    values = np.asarray(samples.seconds, dtype=np.float64)
    order = np.argsort(buckets, kind="stable")
    buckets, values = buckets[order], values[order]
    bounds = np.searchsorted(buckets, np.arange(n + 1))
    for i in range(n):
        chunk = values[bounds[i] : bounds[i + 1]]
        if chunk.size:
            a, b = np.percentile(chunk, (50, 99))
            p50[i], p99[i] = float(a), float(b)
    return p50, p99

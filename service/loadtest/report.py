"""The numbers a load test produces: rates, latency percentiles, errors, and a timeline.

A `LoadReport` is plain data (JSON-ready with `to_dict`): the plot and the text table are drawn
from it alone, so a saved report can be re-rendered later. Latencies are in seconds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.loadtest.recorder import LoadRecorder, Samples

PERCENTILES = (50, 90, 99)
_HISTOGRAM_BINS = 60


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @staticmethod
    def of(values: Any) -> LatencySummary | None:
        data = np.asarray(values, dtype=np.float64)
        if data.size == 0:
            return None
        p50, p90, p99 = np.percentile(data, PERCENTILES)
        return LatencySummary(
            count=int(data.size),
            mean=float(data.mean()),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            max=float(data.max()),
        )


@dataclass(frozen=True)
class Histogram:
    """Counts over log-spaced bins: `edges` has one more entry than `counts`."""

    edges: list[float]
    counts: list[int]

    @staticmethod
    def of(values: Any) -> Histogram | None:
        data = np.asarray(values, dtype=np.float64)
        data = data[data > 0]
        if data.size == 0:
            return None
        low, high = float(data.min()), float(data.max())
        if high <= low * 1.0001:
            high = low * 1.01
        edges = np.geomspace(low, high, _HISTOGRAM_BINS + 1)
        counts, _ = np.histogram(data, bins=edges)
        return Histogram(edges=edges.tolist(), counts=counts.astype(int).tolist())


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


@dataclass
class LoadReport:
    config: dict[str, Any]
    model: str
    version: int  # the version the sessions were pinned to (0 if none was created)
    input_kind: str  # "tokens" or "features"
    sessions: int  # sessions created and driven (the invalid ones not counted)
    window_seconds: float
    messages: int  # frames sent on streams plus Generate calls started
    items: int  # stream items sent
    tokens_in: int  # inputs fed (feed items and prompts)
    tokens_generated: int
    generations: int  # generations that reached their finish reason
    step_latency: LatencySummary | None  # feed items: send → reply
    time_to_first_token: LatencySummary | None
    inter_token_latency: LatencySummary | None
    errors: dict[str, int]  # status code name → count (all operations)
    errors_by_operation: dict[str, dict[str, int]]
    error_examples: dict[str, str]  # code → one message the server sent
    timeline: list[TimelinePoint] = field(default_factory=list)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    # ---- derived rates ---------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_generated

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.window_seconds

    @property
    def tokens_in_per_second(self) -> float:
        return self.tokens_in / self.window_seconds

    @property
    def tokens_generated_per_second(self) -> float:
        return self.tokens_generated / self.window_seconds

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.window_seconds

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    # ---- output ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rates"] = {
            "tokens_per_second": self.tokens_per_second,
            "tokens_in_per_second": self.tokens_in_per_second,
            "tokens_generated_per_second": self.tokens_generated_per_second,
            "messages_per_second": self.messages_per_second,
        }
        data["units"] = "latencies in seconds; rates per second over window_seconds"
        return data

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def render_text(self) -> str:
        c = self.config
        lines = [
            f"seqserve loadtest: {c['target']} model {self.model} v{self.version} "
            f"({self.input_kind}), {self.sessions} sessions"
            + (f" + {c['invalid_sessions']} invalid" if c["invalid_sessions"] else "")
            + f", {self.window_seconds:.1f} s measured",
            f"  {c['tokens_per_message']} per message, think {c['think_ms']:g} ms, "
            f"generate {c['generate_fraction']:.0%} (via {c['generate_via']}, "
            f"{c['max_tokens']} tokens), multiplex {c['multiplex']}, history {c['history']}",
            "",
            f"  throughput  {self.tokens_per_second:>12,.1f} tokens/s   "
            f"(in {self.tokens_in_per_second:,.1f}, generated "
            f"{self.tokens_generated_per_second:,.1f})",
            f"              {self.messages_per_second:>12,.1f} messages/s "
            f"({self.items:,} items, {self.generations:,} generations finished)",
            "",
            f"  {'latency (ms)':<22}{'count':>9}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}"
            f"{'max':>9}",
        ]
        for label, summary in (
            ("per step", self.step_latency),
            ("time to first token", self.time_to_first_token),
            ("inter-token", self.inter_token_latency),
        ):
            if summary is None:
                lines.append(f"  {label:<22}{'-':>9}")
                continue
            ms = [summary.mean, summary.p50, summary.p90, summary.p99, summary.max]
            lines.append(
                f"  {label:<22}{summary.count:>9,}" + "".join(f"{v * 1e3:>9.2f}" for v in ms)
            )
        lines.append("")
        if not self.errors:
            lines.append("  errors      none")
        else:
            lines.append(f"  errors      {self.error_count:,}")
            for op, codes in sorted(self.errors_by_operation.items()):
                for code, n in sorted(codes.items()):
                    lines.append(f"    {op:<10}{code:<22}{n:>9,}  {self.error_examples[code]}")
        return "\n".join(lines)


def build_report(
    recorder: LoadRecorder,
    config: dict[str, Any],
    *,
    model: str,
    version: int,
    input_kind: str,
    sessions: int,
) -> LoadReport:
    by_op: dict[str, dict[str, int]] = defaultdict(dict)
    by_code: dict[str, int] = defaultdict(int)
    for (op, code), n in recorder.errors.items():
        by_op[op][code] = by_op[op].get(code, 0) + n
        by_code[code] += n
    return LoadReport(
        config=config,
        model=model,
        version=version,
        input_kind=input_kind,
        sessions=sessions,
        window_seconds=recorder.window_seconds,
        messages=len(recorder.messages),
        items=recorder.items,
        tokens_in=recorder.tokens_in_total,
        tokens_generated=len(recorder.tokens_generated),
        generations=recorder.generations,
        step_latency=LatencySummary.of(recorder.step_latency.seconds),
        time_to_first_token=LatencySummary.of(recorder.time_to_first_token.seconds),
        inter_token_latency=LatencySummary.of(recorder.inter_token.seconds),
        errors=dict(by_code),
        errors_by_operation=dict(by_op),
        error_examples=dict(recorder.error_examples),
        timeline=_timeline(recorder),
        histograms={
            name: h
            for name, h in (
                ("step_latency", Histogram.of(recorder.step_latency.seconds)),
                ("time_to_first_token", Histogram.of(recorder.time_to_first_token.seconds)),
                ("inter_token_latency", Histogram.of(recorder.inter_token.seconds)),
            )
            if h is not None
        },
    )


def timeline_bucket_seconds(window_seconds: float) -> float:
    """One-second buckets, finer for short runs so a plot still has ~20 points."""
    return 1.0 if window_seconds >= 20 else max(0.05, window_seconds / 20)


def _timeline(recorder: LoadRecorder) -> list[TimelinePoint]:
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
    step_p50, step_p99 = _bucket_percentiles(recorder.step_latency, bucket_of, n)
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

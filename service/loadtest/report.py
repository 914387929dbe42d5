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

from service.loadtest.recorder import LoadRecorder
from service.loadtest.timeline import TimelinePoint, build_timeline

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
class OpenLoopSummary:
    """What the open loop asked for and what it managed. Arrivals, sends, late and dropped
    are counted by arrival time in the window; every latency of the run is measured from the
    arrival (the intended send time), so time waiting for a free session is included."""

    rate: float  # asked: mean arrivals per second
    arrivals: int  # requests due in the window
    sent: int
    late: int  # sent more than `late_ms` after their arrival
    dropped: int  # never sent: no session came free within `max_lag_seconds`, or the run ended
    late_ms: float
    max_lag_seconds: float
    arrival_rate: float  # arrivals per second over the window (the Poisson draw)
    sent_rate: float  # sent per second over the window
    send_lag: LatencySummary | None  # actual send − arrival, of the requests sent


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
    mode: str = "closed"  # "closed" (sessions in closed loops) or "open" (arrivals at a rate)
    open_loop: OpenLoopSummary | None = None

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
            f"{c['max_tokens']} tokens), {_grouping(c)}, history {c['history']}",
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
        if self.open_loop is not None:
            o = self.open_loop
            lines[3:3] = [
                f"  open loop   {o.rate:,.1f} requests/s asked, {o.arrival_rate:,.1f} arrived, "
                f"{o.sent_rate:,.1f} sent",
                f"              {o.arrivals:,} arrivals: {o.late:,} late (> {o.late_ms:g} ms), "
                f"{o.dropped:,} dropped; latencies from the intended send time",
                "",
            ]
        for label, summary in (
            ("per step", self.step_latency),
            ("time to first token", self.time_to_first_token),
            ("inter-token", self.inter_token_latency),
            *([("send lag", self.open_loop.send_lag)] if self.open_loop else []),
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
    open_loop = None
    if config.get("rate", 0) > 0:
        span = max(recorder.window_seconds, 1e-9)
        sent = len(recorder.send_lag)
        open_loop = OpenLoopSummary(
            rate=float(config["rate"]),
            arrivals=recorder.arrivals,
            sent=sent,
            late=recorder.late,
            dropped=len(recorder.dropped),
            late_ms=float(config["late_ms"]),
            max_lag_seconds=float(config["max_lag_seconds"]),
            arrival_rate=recorder.arrivals / span,
            sent_rate=sent / span,
            send_lag=LatencySummary.of(recorder.send_lag.seconds),
        )
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
        timeline=build_timeline(recorder),
        histograms={
            name: h
            for name, h in (
                ("step_latency", Histogram.of(recorder.step_latency.seconds)),
                ("time_to_first_token", Histogram.of(recorder.time_to_first_token.seconds)),
                ("inter_token_latency", Histogram.of(recorder.inter_token.seconds)),
            )
            if h is not None
        },
        mode="open" if open_loop is not None else "closed",
        open_loop=open_loop,
    )


def _grouping(c: dict[str, Any]) -> str:
    """How feeds were grouped into messages: by the load generator, or by the Python client."""
    if c.get("client_mux"):
        return "client-mux (one SeqServeClient coalescing per tick)"
    return f"multiplex {c['multiplex']}"


def check_writable(path: Path) -> None:
    """Raise the OSError that `write_json(path)` would, before a run rather than after it:
    the folders made, the file opened for append (and removed again if it was not there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    with path.open("a"):
        pass
    if not existed:
        path.unlink()

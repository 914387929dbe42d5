"""Benchmark rows, the targets they are judged against, and the RESULTS.md they go into."""

from __future__ import annotations

import itertools
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks.burst import Burst
from service.loadtest import LoadReport


@dataclass(frozen=True)
class Row:
    key: str  # e.g. "service/stream/64"
    label: str
    sessions: int  # sessions, or rows per batch for the in-process step
    tokens_per_second: float
    messages_per_second: float | None
    p50_ms: float | None  # per step (feed) or per token (compute, stateless)
    p99_ms: float | None
    mean_ms: float | None
    ttft_p50_ms: float | None
    itl_p50_ms: float | None
    rows_per_step: float | None  # from the server's seqserve_batch_rows histogram
    server_cpu: float | None  # cores the server process used, on average
    client_cpu: float | None  # cores this (load) process used
    errors: int
    # The server's batched steps' own CPU per token (seqserve_step_cpu_seconds_total over the
    # tokens in and generated), µs: the model's cost as served, beside the load.
    step_cpu_us: float | None = None

    @staticmethod
    def from_report(
        key: str,
        label: str,
        report: LoadReport,
        rows_per_step: float | None,
        server_cpu: float | None,
        client_cpu: float | None,
        step_cpu_us: float | None = None,
    ) -> Row:
        def ms(summary: Any, field: str) -> float | None:
            return None if summary is None else getattr(summary, field) * 1e3

        return Row(
            key=key,
            label=label,
            sessions=report.sessions,
            tokens_per_second=report.tokens_per_second,
            messages_per_second=report.messages_per_second,
            p50_ms=ms(report.step_latency, "p50"),
            p99_ms=ms(report.step_latency, "p99"),
            mean_ms=ms(report.step_latency, "mean"),
            ttft_p50_ms=ms(report.time_to_first_token, "p50"),
            itl_p50_ms=ms(report.inter_token_latency, "p50"),
            rows_per_step=rows_per_step,
            server_cpu=server_cpu,
            client_cpu=client_cpu,
            errors=report.error_count,
            step_cpu_us=step_cpu_us,
        )

    @staticmethod
    def compute(key: str, label: str, batch: int, seconds_per_call: float) -> Row:
        ms = seconds_per_call * 1e3
        return Row(
            key=key, label=label, sessions=batch, tokens_per_second=batch / seconds_per_call,
            messages_per_second=None, p50_ms=ms, p99_ms=None, mean_ms=ms, ttft_p50_ms=None,
            itl_p50_ms=None, rows_per_step=float(batch), server_cpu=None, client_cpu=None,
            errors=0,
        )  # fmt: skip

    @staticmethod
    def burst(key: str, label: str, burst: Burst) -> Row:
        """Generate calls started at once (`benchmarks.burst`): time to first token."""
        return Row(
            key=key, label=label, sessions=burst.sessions,
            tokens_per_second=burst.tokens / burst.seconds, messages_per_second=None,
            p50_ms=None, p99_ms=None, mean_ms=None, ttft_p50_ms=burst.ttft_p50 * 1e3,
            itl_p50_ms=None, rows_per_step=None, server_cpu=None, client_cpu=None, errors=0,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def progress_line(self) -> str:
        p50 = "-" if self.p50_ms is None else f"{self.p50_ms:.3f} ms"
        return f"{self.key:<24} {self.tokens_per_second:>12,.0f} tokens/s  p50 {p50}"


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None  # None: a row it needs is missing
    threshold: float
    higher_is_better: bool
    how: str  # which rows, in words

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        if self.higher_is_better:
            return self.measured >= self.threshold
        return self.measured <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def step_cpu_per_token(
    rows: dict[str, Row], batch: float, kind: str = "compute/step/"
) -> float | None:
    """Seconds of the raw in-process step per token at `batch` rows (linear between the
    measured batch sizes, clamped to them): of feed rows, or with `kind="compute/generate/"`
    of generate rows."""
    points = sorted(
        (r.sessions, r.p50_ms / 1e3 / r.sessions)
        for k, r in rows.items()
        if k.startswith(kind) and r.p50_ms
    )
    if not points:
        return None
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, c0), (b1, c1) in itertools.pairwise(points):
        if batch <= b1:
            return c0 + (c1 - c0) * (batch - b0) / (b1 - b0)
    return points[-1][1]


def share_of_limit(
    rows: dict[str, Row], service: str, echo: str, step_kind: str = "compute/step/"
) -> float | None:
    """How close a path comes to its per-core limit, in CPU: (echo server CPU per token + raw
    step CPU per token at the rows per step the path reached) ÷ the service's CPU per token.
    1.0 = the service adds nothing to gRPC and the model step. CPU-normalised, so a server
    that got less than its core on a loaded machine is not marked down for it."""
    s, e = rows.get(service), rows.get(echo)
    if s is None or e is None or not s.server_cpu or not e.server_cpu or not s.rows_per_step:
        return None
    step = step_cpu_per_token(rows, s.rows_per_step, step_kind)
    if step is None or not s.tokens_per_second or not e.tokens_per_second:
        return None
    return (e.server_cpu / e.tokens_per_second + step) / (s.server_cpu / s.tokens_per_second)


# The rows `cpu_split` breaks down: (service row, echo row).
SPLIT_PATHS = ("stream/1", "stream/16", "stream/64", "mux/64", "client-mux/64", "generate/16",
               "generate/64")  # fmt: skip


@dataclass(frozen=True)
class CpuSplit:
    """Where one path's server CPU per token goes (µs), from one run's rows."""

    path: str
    service: float  # the server process, all threads
    step: float  # its batched steps' own CPU, as served (beside the load on the other core)
    echo: float  # the echo server on the same load
    isolated_step: float | None  # compute/step at the path's rows per step, alone on its core

    @property
    def rest(self) -> float:
        """Everything but the steps: gRPC, the event loop and the request path."""
        return self.service - self.step

    @property
    def added(self) -> float:
        """What the service's own request path adds to the echo server's per-token work."""
        return self.rest - self.echo


def cpu_split(rows: dict[str, Row]) -> list[CpuSplit]:
    out = []
    for path in SPLIT_PATHS:
        s, e = rows.get(f"service/{path}"), rows.get(f"echo/{path}")
        if s is None or e is None or s.step_cpu_us is None:
            continue
        if not (s.server_cpu and e.server_cpu and s.tokens_per_second and e.tokens_per_second):
            continue
        isolated = step_cpu_per_token(rows, s.rows_per_step) if s.rows_per_step else None
        out.append(
            CpuSplit(
                path=path,
                service=1e6 * s.server_cpu / s.tokens_per_second,
                step=s.step_cpu_us,
                echo=1e6 * e.server_cpu / e.tokens_per_second,
                isolated_step=None if isolated is None else 1e6 * isolated,
            )
        )
    return out


def one_session_excess_ms(rows: dict[str, Row]) -> float | None:
    """What one session's step latency (p50) adds to the bare echo round trip plus the raw
    one-row step, in ms: the issue's bound is 0.1 ms."""
    keys = ("service/stream/1", "echo/stream/1", "compute/step/1")
    p50s = [rows[k].p50_ms if k in rows else None for k in keys]
    if any(v is None for v in p50s):
        return None
    service, echo, step = p50s
    assert service is not None and echo is not None and step is not None
    return service - echo - step


def evaluate_targets(rows: dict[str, Row]) -> list[Target]:
    def ratio(a: str, b: str, f: Callable[[Row], float | None]) -> float | None:
        if a not in rows or b not in rows:
            return None
        x, y = f(rows[a]), f(rows[b])
        return None if x is None or not y else x / y

    tps: Callable[[Row], float | None] = lambda r: r.tokens_per_second  # noqa: E731
    mps: Callable[[Row], float | None] = lambda r: r.messages_per_second  # noqa: E731
    p50: Callable[[Row], float | None] = lambda r: r.p50_ms  # noqa: E731
    rows64 = rows.get("service/stream/64")
    return [
        Target("service ≥ 75% of the echo ceiling at 64 sessions (messages/s)",
               ratio("service/stream/64", "echo/stream/64", mps), 0.75, True,
               "service/stream/64 ÷ echo/stream/64"),
        Target("multiplexed frames ≥ 4× one-token-per-message (tokens/s)",
               ratio("service/mux/64", "service/stream/64", tps), 4.0, True,
               "service/mux/64 ÷ service/stream/64"),
        Target("pushed generation ≥ 1.3× one-token-per-message at 16 sessions (tokens/s)",
               ratio("service/generate/16", "service/stream/16", tps), 1.3, True,
               "service/generate/16 ÷ service/stream/16"),
        Target("pushed generation ≥ 1.3× one-token-per-message at 64 sessions (tokens/s)",
               ratio("service/generate/64", "service/stream/64", tps), 1.3, True,
               "service/generate/64 ÷ service/stream/64"),
        Target("per-token latency at history 10,000 within 1.2× history 10 (p50)",
               ratio("service/history/10000", "service/history/10", p50), 1.2, False,
               "service/history/10000 ÷ service/history/10"),
        Target("service ≥ 50× faster per token than stateless at history 1,000",
               ratio("stateless/1000", "service/history/1000", p50), 50.0, True,
               "stateless/1000 ÷ service/history/1000 (p50 per token)"),
        Target("per-core: service ≥ 100× faster per token than stateless at history 1,000",
               ratio("stateless/1000", "service/history/1000", p50), 100.0, True,
               "stateless/1000 ÷ service/history/1000 (p50 per token)"),
        Target("per-core: one session's p50 over (echo p50 + in-process one-row step) ≤ 0.1 ms",
               one_session_excess_ms(rows), 0.1, False,
               "service/stream/1 p50 − echo/stream/1 p50 − compute/step/1 p50 (ms)"),
        Target("mean rows per batched step ≥ 8 at 64 sessions",
               None if rows64 is None else rows64.rows_per_step, 8.0, True,
               "seqserve_batch_rows_sum ÷ _count over service/stream/64"),
        Target("per-core: 64 sessions, 1 token/msg, ≥ 48 rows per step",
               None if rows64 is None else rows64.rows_per_step, 48.0, True,
               "seqserve_batch_rows_sum ÷ _count over service/stream/64"),
        *(
            Target(f"per-core: {what} ≥ 0.9 of its limit (CPU per token)",
                   share_of_limit(rows, f"service/{path}", f"echo/{path}"), 0.9, True,
                   f"(echo/{path} CPU/token + compute step/token at its rows/step) ÷ "
                   f"service/{path} CPU/token")
            for what, path in (("64 sessions, 1 token/msg", "stream/64"),
                               ("64 sessions per frame", "mux/64"),
                               ("Generate, 64 sessions", "generate/64"))
        ),
        # The same share for Generate with the step its path runs: generate rows (each samples
        # its next token from the last head output, then steps), not feed rows (top-5
        # predictions). Shown beside the row above, which keeps the feed step.
        Target("per-core: Generate, 64 sessions ≥ 0.9 of its limit with the in-process "
               "generation step (CPU per token)",
               share_of_limit(rows, "service/generate/64", "echo/generate/64",
                              "compute/generate/"), 0.9, True,
               "(echo/generate/64 CPU/token + compute/generate step/token at its rows/step) ÷ "
               "service/generate/64 CPU/token"),
        Target("per-core: 64 Generate calls started at once, time to first token p50 ≤ 10 ms",
               None if "service/generate-burst/64" not in rows
               else rows["service/generate-burst/64"].ttft_p50_ms, 10.0, False,
               "service/generate-burst/64 TTFT p50 (ms); echo/generate-burst/64 is the same "
               "burst on the bare echo server, echo/generate-burst-1/64 one token a call there "
               "(gRPC's own intake of 64 calls)"),
    ]  # fmt: skip


def machine_info(
    server_cpus: Sequence[int] | None,
    client_cpus: Sequence[int] | None,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    elapsed: float,
) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus_online": os.cpu_count(),
        "server_cpus": list(server_cpus) if server_cpus else "not pinned",
        "client_cpus": list(client_cpus) if client_cpus else "not pinned",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "elapsed_seconds": round(elapsed, 1),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_markdown(
    path: Path,
    rows: list[Row],
    targets: list[Target],
    info: dict[str, Any],
    command: str,
    window: float,
) -> None:
    lines = [
        "# seqserve benchmark results",
        "",
        f"Produced by `{command}` ({info['date']}, {info['elapsed_seconds']} s). "
        f"Each load row is a closed loop measured over {window:g} s after a warm-up; "
        "the server runs in its own process. These are measurements on a shared, noisy "
        "machine, not tests: compare rows of the same run, not runs.",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']} ({info['cpus_online']} online)",
        f"- pinning: servers on CPUs {info['server_cpus']}, load generator and in-process "
        f"rows on {info['client_cpus']}",
        f"- Python {info['python']}, torch {info['torch']} ({info['torch_threads']} thread), "
        f"grpcio {info['grpcio']}; {info['platform']}",
        f"- load average before / after: {info['loadavg_before']} / {info['loadavg_after']}",
        f"- model: {info['model']} from `{info['store']}`",
        f"- the service's state directory: {info.get('state_filesystem') or 'unknown'}",
        "",
        "## Targets",
        "",
        "| target | measured | threshold | met | rows |",
        "|---|---:|---:|:---:|---|",
    ]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "–"}[t.met]
        sign = "≥" if t.higher_is_better else "≤"
        lines.append(
            f"| {t.name} | {_fmt(t.measured, '.2f')} | {sign} {t.threshold:g} | {met} | {t.how} |"
        )
    lines += [
        "",
        "## Measurements",
        "",
        "Latencies in ms: per step (send → reply) for feeds, per call for in-process rows. "
        "CPU columns: cores used on average over the measured window (the server process; "
        "the load-generator process).",
        "",
        "| key | what | sessions | tokens/s | msgs/s | p50 | p99 | TTFT p50 | ITL p50 "
        "| rows/step | server CPU | client CPU | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.key}` | {r.label} | {r.sessions} | {r.tokens_per_second:,.0f} "
            f"| {_fmt(r.messages_per_second, ',.0f')} | {_fmt(r.p50_ms, '.3f')} "
            f"| {_fmt(r.p99_ms, '.3f')} | {_fmt(r.ttft_p50_ms, '.3f')} "
            f"| {_fmt(r.itl_p50_ms, '.3f')} | {_fmt(r.rows_per_step, '.1f')} "
            f"| {_fmt(r.server_cpu, '.2f')} | {_fmt(r.client_cpu, '.2f')} | {r.errors} |"
        )
    splits = cpu_split({r.key: r for r in rows})
    if splits:
        lines += [
            "",
            "## Where the service's CPU goes",
            "",
            "Server CPU per token in µs, from the rows above: the whole server process; of it, "
            "the batched steps' own CPU (`seqserve_step_cpu_seconds_total`, the thread that ran "
            "each step) and the rest (gRPC, the event loop, the request path); the echo server "
            "on the same load; the in-process step (`compute/step`) at the same rows per step, "
            "on the servers' core while they are idle (half before the loads, half after). The "
            "per-core targets divide (echo + in-process step) by service: a step that costs "
            "more as served than alone on that core counts against the service.",
            "",
            "| path | service | step, as served | rest | echo | rest − echo | in-process step "
            "| as served ÷ in-process |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in splits:
            ratio = None if not c.isolated_step else c.step / c.isolated_step
            lines.append(
                f"| {c.path} | {c.service:.1f} | {c.step:.1f} | {c.rest:.1f} | {c.echo:.1f} "
                f"| {c.added:.1f} | {_fmt(c.isolated_step, '.1f')} | {_fmt(ratio, '.2f')} |"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")

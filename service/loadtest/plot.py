"""A PNG of a load test: the latency distributions with their p50 / p99 values written on
them, latency over time (p50 and p99 per bucket), and throughput over time.

Drawn from a `LoadReport` alone. matplotlib is an optional dependency (`seqserve[plot]`),
imported only here and only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.loadtest.report import LoadReport

_SERIES = (
    ("step_latency", "per step", "tab:blue"),
    ("time_to_first_token", "time to first token", "tab:orange"),
    ("inter_token_latency", "inter-token", "tab:green"),
)


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def write_plot(report: LoadReport, path: Path) -> list[str]:
    """Draw the PNG at `path`; return every text drawn on it (titles, labels, annotations)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'seqserve[plot]' (or matplotlib)"
        ) from exc

    from matplotlib.text import Text

    fig, (ax_lat, ax_time, ax_tp) = plt.subplots(3, 1, figsize=(10, 12))
    try:
        _latency_panel(ax_lat, report)
        _latency_over_time_panel(ax_time, report)
        _throughput_panel(ax_tp, report)
        c = report.config
        o = report.open_loop
        load = (
            f"open loop {o.rate:,.0f} req/s ({o.late:,} late, {o.dropped:,} dropped)"
            if o is not None
            else "closed loop, client-mux"
            if c.get("client_mux")
            else f"closed loop, multiplex {c['multiplex']}"
        )
        fig.suptitle(
            f"seqserve loadtest — {report.model} v{report.version}, {report.sessions} sessions, "
            f"{load}, generate {c['generate_fraction']:.0%}, "
            f"{report.tokens_per_second:,.0f} tokens/s"
        )
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
        return [t.get_text() for t in fig.findobj(Text) if t.get_text()]
    finally:
        plt.close(fig)


def _latency_panel(ax: Any, report: LoadReport) -> None:
    summaries = {
        "step_latency": report.step_latency,
        "time_to_first_token": report.time_to_first_token,
        "inter_token_latency": report.inter_token_latency,
    }
    drawn = False
    for row, (key, label, color) in enumerate(_SERIES):
        hist, summary = report.histograms.get(key), summaries[key]
        if hist is None or summary is None:
            continue
        edges_ms = [e * 1e3 for e in hist.edges]
        total = max(1, sum(hist.counts))
        shares = [c / total for c in hist.counts]  # comparable however many samples each has
        ax.stairs(
            shares,
            edges_ms,
            color=color,
            label=f"{label} (n={summary.count:,}): p50 {summary.p50 * 1e3:.2f} ms, "
            f"p99 {summary.p99 * 1e3:.2f} ms",
        )
        for name, value, style in (("p50", summary.p50, "--"), ("p99", summary.p99, ":")):
            ax.axvline(value * 1e3, color=color, linestyle=style, linewidth=1)
            ax.annotate(  # each series at its own height, so close values stay readable
                f"{name} {value * 1e3:.2f} ms",
                xy=(value * 1e3, 0.62 - 0.22 * row),  # below the legend
                xycoords=("data", "axes fraction"),
                xytext=(2, 0),
                textcoords="offset points",
                rotation=90,
                va="top",
                fontsize=8,
                color=color,
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )
        drawn = True
    ax.set_xscale("log")
    latency_from = "intended send" if report.open_loop is not None else "send"
    ax.set_xlabel(f"latency from {latency_from} (ms, log scale); dashed p50, dotted p99")
    ax.set_ylabel("share of samples")
    ax.set_title("latency distribution")
    if drawn:  # the legend repeats each series' p50 and p99
        ax.legend(loc="upper right", framealpha=0.9)
    else:
        ax.text(0.5, 0.5, "no latency samples", transform=ax.transAxes, ha="center")


def _latency_over_time_panel(ax: Any, report: LoadReport) -> None:
    t = [p.t for p in report.timeline]
    drawn = False
    for label, color, p50, p99 in (
        ("per step", "tab:blue", [p.step_p50 for p in report.timeline],
         [p.step_p99 for p in report.timeline]),
        ("time to first token", "tab:orange", [p.ttft_p50 for p in report.timeline],
         [p.ttft_p99 for p in report.timeline]),
    ):  # fmt: skip
        if all(v is None for v in p50):
            continue
        ms = [[float("nan") if v is None else v * 1e3 for v in series] for series in (p50, p99)]
        ax.step(t, ms[0], where="post", color=color, label=f"{label} p50")
        ax.step(t, ms[1], where="post", color=color, linestyle="--", label=f"{label} p99")
        drawn = True
    ax.set_xlabel("seconds into the measured window")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency over time (p50 and p99 per bucket)")
    ax.set_ylim(bottom=0)
    dropped = [p.dropped for p in report.timeline]
    if any(dropped):
        ax_drop = ax.twinx()
        ax_drop.step(t, dropped, where="post", color="tab:red", label="dropped")
        ax_drop.set_ylabel("dropped requests per bucket", color="tab:red")
        ax_drop.set_ylim(bottom=0)
    if drawn:
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no latency samples", transform=ax.transAxes, ha="center")


def _throughput_panel(ax: Any, report: LoadReport) -> None:
    t = [p.t for p in report.timeline]
    fed = [p.tokens_in_per_second for p in report.timeline]
    gen = [p.tokens_generated_per_second for p in report.timeline]
    ax.stackplot(t, fed, gen, labels=("tokens in", "tokens generated"), step="post", alpha=0.7)
    ax.set_xlabel("seconds into the measured window")
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput over time")
    ax.set_ylim(bottom=0)
    errors = [p.errors for p in report.timeline]
    if any(errors):
        ax_err = ax.twinx()
        ax_err.step(t, errors, where="post", color="tab:red", label="errors")
        ax_err.set_ylabel("errors per bucket", color="tab:red")
        ax_err.set_ylim(bottom=0)
    ax.legend(loc="lower left")

"""A PNG of a load test: the latency distributions and throughput over time.

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


def write_plot(report: LoadReport, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'seqserve[plot]' (or matplotlib)"
        ) from exc

    fig, (ax_lat, ax_tp) = plt.subplots(2, 1, figsize=(10, 8))
    try:
        _latency_panel(ax_lat, report)
        _throughput_panel(ax_tp, report)
        c = report.config
        fig.suptitle(
            f"seqserve loadtest — {report.model} v{report.version}, {report.sessions} sessions, "
            f"multiplex {c['multiplex']}, generate {c['generate_fraction']:.0%}, "
            f"{report.tokens_per_second:,.0f} tokens/s"
        )
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def _latency_panel(ax: Any, report: LoadReport) -> None:
    summaries = {
        "step_latency": report.step_latency,
        "time_to_first_token": report.time_to_first_token,
        "inter_token_latency": report.inter_token_latency,
    }
    drawn = False
    for key, label, color in _SERIES:
        hist, summary = report.histograms.get(key), summaries[key]
        if hist is None or summary is None:
            continue
        edges_ms = [e * 1e3 for e in hist.edges]
        total = max(1, sum(hist.counts))
        shares = [c / total for c in hist.counts]  # comparable however many samples each has
        ax.stairs(shares, edges_ms, color=color, label=f"{label} (n={summary.count:,})")
        for value, style in ((summary.p50, "--"), (summary.p99, ":")):
            ax.axvline(value * 1e3, color=color, linestyle=style, linewidth=1)
        drawn = True
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale); dashed p50, dotted p99")
    ax.set_ylabel("share of samples")
    ax.set_title("latency distribution")
    if drawn:
        ax.legend(loc="upper right")
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

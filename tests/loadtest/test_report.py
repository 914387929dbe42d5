"""The report from recorded observations: exact rates, percentiles, window, timeline, errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from service.loadtest import LatencySummary, LoadConfig
from service.loadtest.plot import write_plot
from service.loadtest.progress import ProgressTracker
from service.loadtest.recorder import LoadRecorder
from service.loadtest.report import LoadReport, build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def recorded() -> LoadRecorder:
    """A 10 s window at t = 100 … 110 with known observations, plus some outside it."""
    rec = LoadRecorder()
    rec.open_window(100.0, 10.0)
    for i in range(100):  # one feed of 2 inputs every 0.1 s, latencies 1 … 100 ms
        at = 100.0 + i * 0.1
        rec.message_sent(at, 1)
        rec.fed(at - (i + 1) / 1000, at, 2)
    rec.fed(99.0, 99.5, 2)  # warmup: ignored
    rec.fed(110.0, 110.5, 2)  # after the window: ignored
    rec.prompt_fed(104.0, 3)
    rec.token(103.99, 104.0, first=True)  # ttft 10 ms
    rec.token(104.0, 104.02, first=False)  # itl 20 ms
    rec.generation_finished(104.02)
    rec.error("stream", "NOT_FOUND", "session 'x' not found", 105.5)
    rec.error("stream", "NOT_FOUND", "session 'y' not found", 111.0)  # after: ignored
    rec.error("create", "RESOURCE_EXHAUSTED", "too many sessions", 50.0)  # set-up: counted
    return rec


def report_of(rec: LoadRecorder) -> LoadReport:
    cfg = LoadConfig(target="127.0.0.1:1", model="m", sessions=3).to_dict()
    return build_report(rec, cfg, model="m", version=2, input_kind="tokens", sessions=3)


def test_rates_and_counts_use_the_window_only() -> None:
    report = report_of(recorded())

    assert report.window_seconds == 10.0
    assert report.tokens_in == 2 * 100 + 3
    assert report.tokens_generated == 2
    assert report.tokens_per_second == pytest.approx((203 + 2) / 10)
    assert report.messages == 100 and report.items == 100
    assert report.generations == 1


def test_latency_percentiles() -> None:
    report = report_of(recorded())

    step = report.step_latency
    assert step is not None
    assert step.count == 100
    assert step.p50 == pytest.approx(0.0505)
    assert step.p90 == pytest.approx(0.0901)
    assert step.p99 == pytest.approx(0.09901)
    assert step.max == pytest.approx(0.100)
    assert step.mean == pytest.approx(0.0505)
    assert report.time_to_first_token == LatencySummary(1, *([pytest.approx(0.01)] * 5))
    assert report.inter_token_latency is not None
    assert report.inter_token_latency.p99 == pytest.approx(0.02)


def test_errors_by_code_and_operation() -> None:
    report = report_of(recorded())

    assert report.errors == {"NOT_FOUND": 1, "RESOURCE_EXHAUSTED": 1}
    assert report.errors_by_operation == {
        "stream": {"NOT_FOUND": 1},
        "create": {"RESOURCE_EXHAUSTED": 1},
    }
    assert report.error_examples["NOT_FOUND"] == "session 'x' not found"


def test_timeline_buckets_sum_to_the_totals() -> None:
    report = report_of(recorded())

    width = report.timeline[1].t - report.timeline[0].t
    assert width == pytest.approx(0.5)  # short run: 20 buckets
    assert len(report.timeline) == 20
    fed = sum(p.tokens_in_per_second * width for p in report.timeline)
    assert fed == pytest.approx(report.tokens_in)
    assert sum(p.errors for p in report.timeline) == 1
    assert report.timeline[11].errors == 1  # at 105.5 s: the bucket starting 5.5 s in
    first = report.timeline[0]  # feeds at 0.0 … 0.4 s, latencies 1 … 5 ms
    assert first.step_p50 == pytest.approx(0.003)


def test_empty_run_has_no_latencies() -> None:
    rec = LoadRecorder()
    rec.open_window(0.0, 1.0)
    report = report_of(rec)

    assert report.step_latency is None and report.time_to_first_token is None
    assert report.tokens_per_second == 0
    assert "errors      none" in report.render_text()


def test_json_round_trips(tmp_path: Path) -> None:
    report = report_of(recorded())
    path = tmp_path / "out" / "report.json"

    report.write_json(path)

    data = json.loads(path.read_text())
    assert data["rates"]["tokens_per_second"] == pytest.approx(report.tokens_per_second)
    assert data["step_latency"]["p99"] == pytest.approx(0.09901)
    assert data["errors"] == {"NOT_FOUND": 1, "RESOURCE_EXHAUSTED": 1}
    assert data["config"]["sessions"] == 3
    assert len(data["timeline"]) == 20
    assert len(data["histograms"]["step_latency"]["edges"]) == 61


def test_plot_is_a_png_with_p50_p99_values_and_latency_over_time(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"

    texts = write_plot(report_of(recorded()), path)

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (1000, 1200)
    # The per-step p50 / p99 (50.50 / 99.01 ms) written on the distribution, and in the legend.
    assert "p50 50.50 ms" in texts and "p99 99.01 ms" in texts
    assert "p50 10.00 ms" in texts  # time to first token
    assert any("per step (n=100): p50 50.50 ms, p99 99.01 ms" in t for t in texts)
    assert "latency over time (p50 and p99 per bucket)" in texts
    assert {"per step p50", "per step p99", "time to first token p99"} <= set(texts)
    assert "closed loop, multiplex 1" in " ".join(texts)


def open_loop_recorded() -> LoadRecorder:
    """An open loop over a 10 s window at t = 100: 50 arrivals, 40 sent (10 of them late),
    10 dropped; each answered 5 ms after it was sent."""
    rec = LoadRecorder()
    rec.open_window(100.0, 10.0)
    for i in range(50):
        due = 100.0 + i * 0.2
        rec.arrived(due)
        if i % 5 == 4:
            rec.drop(due)  # counted by its due time, whenever it is given up
            continue
        lag = 0.05 if i % 4 == 0 else 0.001
        rec.started(due, due + lag, late=lag > 0.01)
        rec.message_sent(due + lag, 0)
        rec.fed(due, due + lag + 0.005, 1)
    rec.arrived(99.0)  # before the window: not counted
    rec.drop(99.5)
    return rec


def test_open_loop_summary_and_latency_from_the_intended_time(tmp_path: Path) -> None:
    cfg = LoadConfig(target="127.0.0.1:1", model="m", rate=5.0, late_ms=10.0).to_dict()
    report = build_report(
        open_loop_recorded(), cfg, model="m", version=1, input_kind="tokens", sessions=2
    )

    o = report.open_loop
    assert report.mode == "open" and o is not None
    assert (o.arrivals, o.sent, o.dropped, o.late) == (50, 40, 10, 10)
    assert o.rate == 5.0 and o.arrival_rate == pytest.approx(5.0) and o.sent_rate == 4.0
    assert o.send_lag is not None and o.send_lag.max == pytest.approx(0.05)
    step = report.step_latency
    assert step is not None and step.max == pytest.approx(0.055)  # lag + service time
    assert sum(p.dropped for p in report.timeline) == 10
    data = json.loads(json.dumps(report.to_dict()))
    assert data["mode"] == "open"
    assert data["open_loop"]["dropped"] == 10 and data["open_loop"]["send_lag"]["count"] == 40
    text = report.render_text()
    assert "50 arrivals: 10 late (> 10 ms), 10 dropped" in text and "send lag" in text
    texts = write_plot(report, tmp_path / "open.png")
    assert any("open loop 5 req/s (10 late, 10 dropped)" in t for t in texts)
    assert "dropped requests per bucket" in texts


def test_closed_loop_report_has_no_open_loop_part() -> None:
    report = report_of(recorded())

    assert report.mode == "closed" and report.open_loop is None
    assert "open loop" not in report.render_text()


def test_text_report_names_every_figure() -> None:
    text = report_of(recorded()).render_text()

    assert "20.5 tokens/s" in text
    assert "per step" in text and "time to first token" in text and "inter-token" in text
    assert "NOT_FOUND" in text and "RESOURCE_EXHAUSTED" in text


def test_progress_rates_are_since_the_last_snapshot() -> None:
    rec = LoadRecorder()
    rec.open_window(0.0, 100.0)
    tracker = ProgressTracker(rec, sessions=2, started_at=0.0, total=100.0)
    for i in range(10):
        rec.fed(i * 0.1, i * 0.1 + 0.002, 1)
    first = tracker.snapshot(1.0, "measuring")
    for i in range(40):
        rec.fed(1.0 + i * 0.01, 1.0 + i * 0.01 + 0.004, 1)
    second = tracker.snapshot(2.0, "measuring")

    assert first.tokens_per_second == pytest.approx(10)
    assert first.step_p50 == pytest.approx(0.002)
    assert second.tokens_per_second == pytest.approx(40)
    assert second.step_p50 == pytest.approx(0.004)
    assert second.tokens == 50


def test_summary_matches_numpy() -> None:
    values = np.random.default_rng(0).exponential(0.01, 1000)
    s = LatencySummary.of(values)

    assert s is not None
    assert (s.p50, s.p90, s.p99) == tuple(
        pytest.approx(v) for v in np.percentile(values, (50, 90, 99))
    )
    assert s.max == values.max()

"""The per-core targets: a path's share of its limit, from the rows of one benchmark run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from benchmarks.results import (
    Row,
    cpu_split,
    evaluate_targets,
    one_session_excess_ms,
    share_of_limit,
    step_cpu_per_token,
    write_markdown,
)


def _load(key: str, tps: float, cpu: float, rows_per_step: float | None = None) -> Row:
    return Row(
        key=key, label=key, sessions=64, tokens_per_second=tps, messages_per_second=tps,
        p50_ms=None, p99_ms=None, mean_ms=None, ttft_p50_ms=None, itl_p50_ms=None,
        rows_per_step=rows_per_step, server_cpu=cpu, client_cpu=None, errors=0,
    )  # fmt: skip


def _rows() -> dict[str, Row]:
    rows = [
        Row.compute("compute/step/1", "step", 1, 0.5e-3),  # 0.5 ms per token
        Row.compute("compute/step/16", "step", 16, 1.6e-3),  # 0.1 ms per token
        Row.compute("compute/step/64", "step", 64, 3.2e-3),  # 0.05 ms per token
        _load("echo/stream/64", tps=10_000, cpu=1.0),  # 0.1 ms of CPU per token
        _load("service/stream/64", tps=4_000, cpu=0.8, rows_per_step=64),  # 0.2 ms
    ]
    return {r.key: r for r in rows}


def test_the_step_cost_is_interpolated_between_measured_batch_sizes() -> None:
    rows = _rows()
    assert step_cpu_per_token(rows, 64) == pytest.approx(0.05e-3)
    assert step_cpu_per_token(rows, 40) == pytest.approx(0.075e-3)  # halfway 16 → 64
    assert step_cpu_per_token(rows, 200) == pytest.approx(0.05e-3)  # clamped
    assert step_cpu_per_token({}, 8) is None


def test_share_of_limit_is_the_cpu_the_limit_needs_over_the_cpu_the_service_took() -> None:
    rows = _rows()
    # (0.1 ms echo + 0.05 ms step) / 0.2 ms of service CPU per token
    assert share_of_limit(rows, "service/stream/64", "echo/stream/64") == pytest.approx(0.75)
    assert share_of_limit(rows, "service/mux/64", "echo/mux/64") is None  # rows missing
    by_name = {t.name: t for t in evaluate_targets(rows)}
    target = by_name["per-core: 64 sessions, 1 token/msg ≥ 0.9 of its limit (CPU per token)"]
    assert target.measured == pytest.approx(0.75) and target.met is False
    assert by_name["per-core: 64 sessions, 1 token/msg, ≥ 48 rows per step"].met is True


def test_the_cpu_split_separates_the_step_as_served_from_the_rest() -> None:
    rows = _rows()
    served = dataclasses.replace(rows["service/stream/64"], step_cpu_us=80.0)
    rows["service/stream/64"] = served
    (split,) = cpu_split(rows)  # the only path with both rows and a step figure
    assert split.path == "stream/64"
    assert split.service == pytest.approx(200.0)  # 0.8 cores / 4,000 tokens/s
    assert (split.step, split.rest, split.echo) == (80.0, pytest.approx(120.0), 100.0)
    assert split.added == pytest.approx(20.0)  # the request path over the echo server
    assert split.isolated_step == pytest.approx(50.0)  # compute/step/64: 3.2 ms / 64


def test_results_md_carries_the_cpu_split(tmp_path: Path) -> None:
    rows = _rows()
    rows["service/stream/64"] = dataclasses.replace(rows["service/stream/64"], step_cpu_us=80.0)
    info = {
        "date": "today", "elapsed_seconds": 1, "cpu": "cpu", "cpus_online": 2,
        "server_cpus": [1], "client_cpus": [0], "python": "3", "torch": "t",
        "torch_threads": 1, "grpcio": "g", "platform": "p", "loadavg_before": [0, 0, 0],
        "loadavg_after": [0, 0, 0], "model": "m", "store": "s",
        "state_filesystem": "ext4 on /dev/vda at /, without a journal",
    }  # fmt: skip
    out = tmp_path / "RESULTS.md"
    write_markdown(out, list(rows.values()), evaluate_targets(rows), info, "cmd", 5.0)
    text = out.read_text()
    assert "- the service's state directory: ext4 on /dev/vda at /, without a journal" in text
    assert "## Where the service's CPU goes" in text
    assert "| stream/64 | 200.0 | 80.0 | 120.0 | 100.0 | 20.0 | 50.0 | 1.60 |" in text


def test_one_session_is_judged_against_the_echo_round_trip_plus_the_raw_step() -> None:
    rows = _rows()  # compute/step/1: 0.5 ms
    assert one_session_excess_ms(rows) is None  # no one-session rows
    for key, p50 in (("service/stream/1", 0.75), ("echo/stream/1", 0.2)):
        rows[key] = dataclasses.replace(_load(key, tps=1_000, cpu=0.5), p50_ms=p50)
    assert one_session_excess_ms(rows) == pytest.approx(0.05)
    by_name = {t.name: t for t in evaluate_targets(rows)}
    (target,) = [t for name, t in by_name.items() if name.startswith("per-core: one session")]
    assert target.measured == pytest.approx(0.05) and target.met is True
    rows["service/stream/1"] = dataclasses.replace(rows["service/stream/1"], p50_ms=0.85)
    (target,) = [t for t in evaluate_targets(rows) if t.name.startswith("per-core: one session")]
    assert target.measured == pytest.approx(0.15) and target.met is False


def test_generate_is_judged_against_its_own_generation_step_too() -> None:
    """Two shares for Generate at 64: with the feed step (as before) and with the in-process
    generation step, each from its own compute rows."""
    rows = _rows()  # compute/step/64: 0.05 ms per token
    rows["compute/generate/64"] = Row.compute("compute/generate/64", "gen", 64, 4.8e-3)  # 0.075
    rows["echo/generate/64"] = _load("echo/generate/64", tps=10_000, cpu=1.0)  # 0.1 ms
    rows["service/generate/64"] = _load("service/generate/64", tps=4_000, cpu=1.0,
                                        rows_per_step=64)  # 0.25 ms  # fmt: skip
    assert step_cpu_per_token(rows, 64, "compute/generate/") == pytest.approx(0.075e-3)
    by_name = {t.name: t for t in evaluate_targets(rows)}
    feed = by_name["per-core: Generate, 64 sessions ≥ 0.9 of its limit (CPU per token)"]
    assert feed.measured == pytest.approx((0.1 + 0.05) / 0.25)
    own = by_name["per-core: Generate, 64 sessions ≥ 0.9 of its limit with the in-process "
                  "generation step (CPU per token)"]  # fmt: skip
    assert own.measured == pytest.approx((0.1 + 0.075) / 0.25)
    del rows["compute/generate/64"]
    by_name = {t.name: t for t in evaluate_targets(rows)}
    assert by_name[own.name].measured is None  # no generation step measured: not judged

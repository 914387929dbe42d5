"""The per-core targets: a path's share of its limit, from the rows of one benchmark run."""

from __future__ import annotations

import pytest

from benchmarks.results import Row, evaluate_targets, share_of_limit, step_cpu_per_token


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

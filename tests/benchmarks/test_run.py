"""`benchmarks.run`'s in-process rows: measured in two halves (before and after the loads) on
the servers' CPU, combined into one row each, each half's figure kept in the report."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks import inprocess, run
from benchmarks.inprocess import Timing


def test_in_process_rows_combine_their_two_halves_on_the_servers_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen_cpus: list[set[int]] = []
    now = {"per_call": 0.0}  # seconds a call, in the half being measured

    def timing(*_: Any) -> Timing:
        seen_cpus.append(os.sched_getaffinity(0))
        return Timing(calls=10, seconds=10 * now["per_call"])

    monkeypatch.setattr(inprocess, "load_model", lambda *_: None)
    for name in ("batched_step", "generation_step", "stateless_per_token"):
        monkeypatch.setattr(inprocess, name, timing)
    bench = run.Bench(argparse.Namespace(quick=True, model="m"), None, None)  # type: ignore[arg-type]
    before = os.sched_getaffinity(0)
    server_cpus = sorted(before)[-1:]
    for per_call in (2.0, 4.0):  # before the loads, then after
        now["per_call"] = per_call
        bench.measure_inprocess(Path("store"), server_cpus)
        assert os.sched_getaffinity(0) == before  # the load generator's CPUs again
    bench.inprocess_rows()

    assert seen_cpus and all(cpus == set(server_cpus) for cpus in seen_cpus)
    rows = {r.key: r for r in bench.rows}
    assert sorted(rows) == sorted(
        [f"compute/step/{b}" for b in (1, 16, 64)]
        + [f"compute/generate/{b}" for b in (1, 16, 64)]
        + [f"stateless/{h}" for h in (10, 1000, 10000)]
    )
    step64 = rows["compute/step/64"]
    assert step64.p50_ms == pytest.approx(3000.0)  # (10 × 2 s + 10 × 4 s) / 20 calls
    assert step64.tokens_per_second == pytest.approx(64 / 3.0)
    assert rows["stateless/1000"].sessions == 1
    assert rows["stateless/1000"].label == "stateless: re-run 1,000 tokens per token"
    drift = bench.reports["inprocess halves"]["per_call_ms_before_and_after_the_loads"]
    assert drift["compute/step/64"] == [2000.0, 4000.0]  # type: ignore[index]

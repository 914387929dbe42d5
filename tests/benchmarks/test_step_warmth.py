"""benchmarks.step_warmth: only the step's own CPU time is counted, each way runs what it
says between steps, and a small run on the bundled model reports every way for every batch
size."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import step_warmth
from benchmarks.step_warmth import BACK_TO_BACK, BUSY, IDLE, main, measure, parse_args


def test_only_the_steps_cpu_is_counted_and_the_gap_is_timed_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = [0.0]  # a fake thread clock: the step takes 5 units of it, the gap 100
    wall = [0.0]
    monkeypatch.setattr(step_warmth.time, "thread_time", lambda: cpu[0])
    monkeypatch.setattr(step_warmth.time, "perf_counter", lambda: wall[0])

    def step() -> None:
        cpu[0] += 5.0

    def between() -> None:
        cpu[0] += 100.0
        wall[0] += 7.0

    assert step_warmth._step_cpu(step, between, steps=4) == (5.0, 7.0)


def test_each_way_runs_what_it_says_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(step_warmth.time, "sleep", slept.append)
    ways = step_warmth._ways(gap=0.002, walk_mb=[1])
    assert list(ways) == [BACK_TO_BACK, IDLE, BUSY, "after a walk of 1 MB"]
    ways[IDLE]()
    assert slept == [0.002]  # the idle gap sleeps
    started = time.perf_counter()
    ways[BUSY]()
    assert time.perf_counter() - started >= 0.002  # the busy gap spins until its deadline
    assert slept == [0.002]  # without sleeping
    started_cpu = time.thread_time()
    for _ in range(20):
        ways["after a walk of 1 MB"]()  # 20 MB read and written: real work, on this thread
    assert time.thread_time() > started_cpu


def test_a_small_run_times_every_way_for_every_batch_size() -> None:
    args = parse_args(
        ["--rows", "1", "3", "--gap-us", "20", "--walk-mb", "1", "--steps", "4", "--rounds", "2"]
    )
    results = measure(args)
    ways = [BACK_TO_BACK, IDLE, BUSY, "after a walk of 1 MB"]
    assert [(r["rows"], r["way"]) for r in results] == [(n, w) for n in (1, 3) for w in ways]
    for r in results:
        assert r["step_us"] > 0
        assert len(str(r["rounds_us"]).split(", ")) == 2  # one figure per round
    gaps = {(r["rows"], r["way"]): float(r["gap_us"]) for r in results}
    assert all(gaps[(n, BUSY)] >= 20 and gaps[(n, IDLE)] >= 20 for n in (1, 3))  # at least asked


def test_main_prints_the_table_and_writes_json(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "warmth.json"
    argv = ["--rows", "2", "--walk-mb", "--steps", "2", "--rounds", "1", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| 2 | after an idle gap |" in table and "walk of" not in table  # no walks asked
    assert [r["way"] for r in json.loads(out.read_text())] == [BACK_TO_BACK, IDLE, BUSY]

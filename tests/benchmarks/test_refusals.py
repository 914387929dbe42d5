"""benchmarks.refusals against a real server: refused requests counted, and the thaw read."""

from __future__ import annotations

import os

import pytest

from benchmarks.refusals import REPO, measure, parse_args
from benchmarks.run import split_cpus


@pytest.mark.integration
@pytest.mark.parametrize("load", ["unary", "inband"])
def test_a_short_run_counts_refusals_and_reads_the_thaw(load: str) -> None:
    args = parse_args([load, "--seconds", "1", "--concurrency", "4"])
    cpus = os.sched_getaffinity(0)
    result = measure(args, REPO, load, split_cpus(False)[0])
    assert os.sched_getaffinity(0) == cpus  # only `main` pins this process (to the load's CPUs)
    assert result["load"] == load and result["server_root"] == str(REPO)
    assert result["refusals"] > 10 and result["refusals_per_second"] > 0
    assert result["server_cpu_us_per_refusal"] > 0
    assert result["young_collections"] >= 0
    # Refusals leave no reference cycle (before a6f77ab, thousands of objects a run).
    assert result["thawed_garbage_objects"] == 0


def test_loads_default_to_both_and_unknown_ones_are_refused() -> None:
    assert parse_args([]).loads == ["unary", "inband"]
    with pytest.raises(SystemExit):
        parse_args(["sideways"])

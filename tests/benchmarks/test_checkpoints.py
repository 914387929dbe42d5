"""benchmarks.checkpoints on a real engine: both ways of writing idle checkpoints, and a
shutdown's writes, timed."""

from __future__ import annotations

from benchmarks.checkpoints import measure, parse_args


async def test_a_small_run_times_both_ways() -> None:
    per_pass = await measure(parse_args(["--sessions", "40", "--per-pass", "10"]))
    assert len(per_pass["one by one"]) == len(per_pass["batched"]) == 2
    assert len(per_pass["shutdown (spill_all)"]) == 1  # it checks that all 40 were written
    assert all(v > 0 for values in per_pass.values() for v in values)

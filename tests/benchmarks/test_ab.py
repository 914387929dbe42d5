"""`benchmarks.ab` end to end on a tiny window: two real servers (here the same tree twice),
each load run against both, and the medians it reports read from those runs."""

from __future__ import annotations

from benchmarks import ab
from benchmarks.results import Row
from benchmarks.run import REPO


async def test_both_trees_serve_each_load_and_the_summary_reads_their_rows() -> None:
    args = ab.parse_args(
        ["stream1", "burst64x1", "--base", str(REPO), "--reps", "1", "--window", "0.5", "--no-pin"]
    )
    results = await ab.main_async(args)
    assert set(results) == {"stream1", "burst64x1"}
    for name in ("base", "head"):  # 64 one-token generations started at once, 4 rounds
        burst = results["burst64x1"][name]
        assert burst["ttft_p50_ms"] is not None and burst["ttft_p50_ms"] > 0
        assert burst["tokens_per_second"] is not None and burst["tokens_per_second"] > 0
    for name in ("base", "head"):
        s = results["stream1"][name]
        assert s["tokens_per_second"] is not None and s["tokens_per_second"] > 0
        assert s["rows_per_step"] == 1.0  # one session: one row per step
        assert s["p50_ms"] is not None and s["p99_ms"] is not None
        assert s["p50_ms"] <= s["p99_ms"]


def test_the_summary_is_the_median_over_repetitions() -> None:
    def row(tps: float, cpu: float) -> Row:
        return Row(
            key="k", label="k", sessions=1, tokens_per_second=tps, messages_per_second=tps,
            p50_ms=None, p99_ms=None, mean_ms=None, ttft_p50_ms=None, itl_p50_ms=None,
            rows_per_step=1.0, server_cpu=cpu, client_cpu=None, errors=0,
        )  # fmt: skip

    s = ab.summary([row(1000, 0.5), row(3000, 0.6), row(2000, 1.0)])
    assert s["tokens_per_second"] == 2000
    assert s["cpu_us_per_token"] == 500.0  # medians of 500, 200, 500 µs per token
    assert s["p50_ms"] is None

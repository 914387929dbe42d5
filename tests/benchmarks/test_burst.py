"""The burst row (Generate calls started at once) over real gRPC against the echo server: every
generation of every measured round is timed to its first token, and its tokens counted; the
row and the target read the time to first token from it."""

from __future__ import annotations

from benchmarks.burst import generation_burst
from benchmarks.results import Row, evaluate_targets


async def test_each_generation_of_each_round_is_timed_to_its_first_token(echo_target: str) -> None:
    burst = await generation_burst(echo_target, "m", sessions=5, rounds=3, max_tokens=4)
    assert len(burst.ttft_seconds) == 5 * 3  # the warm-up round is not counted
    assert all(0 < t < burst.seconds for t in burst.ttft_seconds)
    assert burst.tokens == 5 * 3 * 4
    assert min(burst.ttft_seconds) <= burst.ttft_p50 <= burst.ttft_p99
    row = Row.burst("service/generate-burst/64", "burst", burst)
    assert row.ttft_p50_ms == burst.ttft_p50 * 1e3
    assert row.tokens_per_second == burst.tokens / burst.seconds
    (target,) = [t for t in evaluate_targets({row.key: row}) if "started at once" in t.name]
    assert target.measured == row.ttft_p50_ms
    assert target.met == (row.ttft_p50_ms <= 10.0)

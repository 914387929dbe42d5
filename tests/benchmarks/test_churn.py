"""benchmarks.churn against a real server: sessions made while one more session is probed."""

from __future__ import annotations

import pytest

from benchmarks.churn import REPO, measure, parse_args


@pytest.mark.integration
def test_a_small_run_probes_one_session_beside_the_creations() -> None:
    args = parse_args(
        ["--sessions", "400", "--concurrency", "8", "--probe-after", "0.2", "--probe-seconds", "1"]
    )
    result = measure(args, REPO)
    assert result["sessions_per_second"] > 0 and result["server_root"] == str(REPO)
    probe = result["probe_ms"]
    assert probe["count"] > 10  # a feed every 5 ms for a second, answered
    assert 0 < probe["p50"] <= probe["p99"] <= probe["max"]

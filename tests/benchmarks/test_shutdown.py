"""benchmarks.shutdown against a real server: sessions made, SIGTERM timed, a clean exit."""

from __future__ import annotations

import pytest

from benchmarks.shutdown import measure, parse_args


@pytest.mark.integration
def test_a_small_run_times_the_stop_of_a_real_server() -> None:
    args = parse_args(
        ["--sessions", "60", "--pool-slots", "16", "--idle", "0.5", "--concurrency", "8"]
    )
    result = measure(args)
    made = result["create_with_prefix"]
    assert made["sessions"] == 60 and made["errors"] == 0 and made["sessions_per_second"] > 0
    assert result["exit_code"] == 0 and 0 < result["stop_seconds"] < 60
    assert any("spilled 16 sessions" in line for line in result["shutdown_log"])

"""benchmarks.churn against a real server: sessions made while one more session is probed."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.churn import REPO, measure, parse_args
from benchmarks.filesystem import describe
from benchmarks.run import split_cpus


@pytest.mark.integration
def test_a_small_run_probes_one_session_beside_the_creations() -> None:
    args = parse_args(
        ["--sessions", "400", "--concurrency", "8", "--probe-after", "0.2", "--probe-seconds", "1",
         "--settle", "0.5"]
    )  # fmt: skip
    result = measure(args, REPO, split_cpus(False)[0])
    assert result["sessions_per_second"] > 0 and result["server_root"] == str(REPO)
    probe = result["probe_ms"]
    assert probe["count"] > 10  # a feed every 5 ms for a second, answered
    assert 0 < probe["p50"] <= probe["p99"] <= probe["max"]
    cpu = result["server_cpu_us_per_creation"]
    # Counted in clock ticks (10 ms): the loop's share shows in a run this small; the other
    # threads' (a few chunk steps, store readings only when the store changes) may read 0.
    assert cpu["main_thread"] > 0 and cpu["other_threads"] >= 0
    assert result["rows_per_step"] >= 1.0  # each creation's prefix was stepped


@pytest.mark.integration
def test_without_a_probe_it_reports_the_creations_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle checkpoints after 1 s, not 5 (the server inherits the environment): 300 of them are
    # written (sweep every second) and exported (gauges every second) well within the settle.
    monkeypatch.setenv("SEQSERVE_SESSIONS__CHECKPOINT_IDLE_SECONDS", "1")
    args = parse_args(["--sessions", "300", "--concurrency", "8", "--probe-seconds", "0",
                       "--settle", "5", "--scratch", str(tmp_path)])  # fmt: skip
    result = measure(args, REPO, split_cpus(False)[0])
    assert result["probe_ms"] is None and result["sessions_per_second"] > 0
    assert result["server_cpu_us_per_creation"]["main_thread"] > 0
    assert Path(result["state_dir"]).parent.parent == tmp_path  # --scratch: where state went
    assert result["state_writes"] >= 300  # an idle checkpoint each, counted by the server
    assert result["state_write_us"] > 0
    assert result["state_filesystem"] == describe(tmp_path).summary()  # type: ignore[union-attr]
    assert list(tmp_path.iterdir()) == []  # and nothing left behind

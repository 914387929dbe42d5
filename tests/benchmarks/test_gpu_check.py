"""benchmarks.gpu_check keeps working without a GPU: its comparison, run CPU against CPU."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_check import main


def test_the_device_check_runs_against_the_engine_on_cpu(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--sessions", "4", "--iters", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is True and report["device"] == "cpu"
    # every session's steps, chunks and generated tokens were compared, and agree exactly
    assert report["lstm_values_compared"] > 4 * 6 and report["lstm_max_abs_diff"] == 0.0
    assert report["gru-article_values_compared"] >= 4 * 6
    assert report["gru-article_max_abs_diff"] == 0.0
    assert set(report["step_timings"]) == {"1", "64", "256"}

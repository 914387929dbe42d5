"""benchmarks.memory's measuring parts: a session's hidden-state bytes from the manifest, RSS
and disk usage read from the system, and the table's verdicts (the benchmark itself takes
minutes and is not run here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.memory import dir_usage, hidden_state_bytes, rss_bytes, table
from benchmarks.processes import mean_write_us

STORE = Path(__file__).resolve().parents[2] / "model_store"


def test_the_hidden_state_counts_h_and_c_for_an_lstm_and_h_for_a_gru() -> None:
    assert hidden_state_bytes(STORE, "bytes-lstm") == 2 * 2 * 256 * 4  # h and c, 2 x 256
    gru = STORE / "co2-gru"
    versions = sorted(int(d.name) for d in gru.iterdir() if d.name.isdigit())
    manifest = json.loads((gru / str(versions[-1]) / "manifest.json").read_text())
    expected = manifest["num_layers"] * manifest["hidden_size"] * 4
    assert hidden_state_bytes(STORE, "co2-gru") == expected


def test_rss_is_read_from_proc_and_grows_with_touched_memory() -> None:
    before = rss_bytes(os.getpid())
    block = bytearray(64 << 20)  # zero pages: written below so they count
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert rss_bytes(os.getpid()) - before >= 48 << 20
    del block


def test_dir_usage_counts_files_bytes_and_allocated_blocks(tmp_path: Path) -> None:
    (tmp_path / "a.spill").write_bytes(b"x" * 5000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.spill").write_bytes(b"y" * 10)
    files, size, allocated = dir_usage(tmp_path)
    assert (files, size) == (2, 5010)
    assert allocated >= 5010  # whole blocks


def _result(ratio: float, rate: float, spilled: int) -> dict[str, object]:
    churn = {"sessions": 100, "sessions_per_second": rate, "errors": 0,
             "load_average_1m_before": 1.0}  # fmt: skip
    return {
        "concurrency": 64,
        "resident": {
            "sessions": 100, "state_bytes_per_session": 4096,
            "rss_growth_per_session": ratio * 4096, "ratio_to_state": ratio,
            "create_then_step": churn,
        },
        "spill": {
            "sessions": spilled, "pool_slots": 16, "spill_files": spilled,
            "create_then_step": churn, "rss_growth_per_session": 1000.0,
            "disk_bytes_per_session": 6000.0, "disk_allocated_per_session": 8192.0,
        },
    }  # fmt: skip


def test_the_table_says_which_targets_are_met() -> None:
    met = table(_result(ratio=1.42, rate=2500.0, spilled=1_000_000)).splitlines()
    assert "1.42× | ≤ 1.5× | yes |" in met[2]
    assert "2,500 sessions/s" in met[3] and met[3].endswith("| yes |")
    assert "6,000 B" in met[4] and met[4].endswith("| yes |")
    missed = table(_result(ratio=1.51, rate=235.0, spilled=30_000)).splitlines()
    assert missed[2].endswith("| no |") and missed[3].endswith("| no |")
    assert missed[4].endswith("| not at this count |")
    assert "state writes" not in table(_result(ratio=1.4, rate=900.0, spilled=10))  # unmeasured


def test_the_disks_price_of_a_state_write_is_printed_beside_the_rates() -> None:
    result = _result(ratio=1.4, rate=900.0, spilled=10)
    result["resident"]["create_then_step"] = {  # type: ignore[index]
        **result["resident"]["create_then_step"],  # type: ignore[index]
        "state_write_us": 412.4,
    }
    result["spill"]["create_then_step"] = {  # type: ignore[index]
        **result["spill"]["create_then_step"],  # type: ignore[index]
        "state_write_us": 17.0,
    }
    lines = table(result).splitlines()
    assert "state writes 412 µs each" in lines[3]
    assert "state writes 17 µs each" in lines[4]
    assert not any(line.startswith("State directories") for line in lines)  # not known
    result["state_filesystem"] = "tmpfs on tmpfs at /dev/shm"
    assert table(result).splitlines()[-1] == "State directories: tmpfs on tmpfs at /dev/shm."


def test_the_mean_write_comes_from_the_two_counters_between_readings() -> None:
    assert mean_write_us((10.0, 0.5), (110.0, 0.53)) == pytest.approx(300.0)
    assert mean_write_us((10.0, 0.5), (10.0, 0.5)) is None  # no writes: no figure

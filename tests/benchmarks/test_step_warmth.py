"""benchmarks.step_warmth on the bundled model: every way of running the step is timed, for
each batch size, against the back-to-back step."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.step_warmth import main, measure, parse_args


def test_a_small_run_times_every_way_for_every_batch_size() -> None:
    args = parse_args(
        ["--rows", "1", "3", "--gap-us", "20", "--walk-mb", "1", "--steps", "4", "--rounds", "2"]
    )
    results = measure(args)
    ways = ["back to back", "after an idle gap", "after a busy gap", "after a walk of 1 MB"]
    assert [(r["rows"], r["way"]) for r in results] == [(n, w) for n in (1, 3) for w in ways]
    for r in results:
        assert r["step_us"] > 0
        assert abs(float(r["per_row_us"]) * int(r["rows"]) - float(r["step_us"])) < 1e-6
        assert len(str(r["rounds_us"]).split(", ")) == 2  # one figure per round
    assert [r["vs_back_to_back"] for r in results if r["way"] == "back to back"] == [1.0, 1.0]


def test_main_prints_the_table_and_writes_json(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "warmth.json"
    argv = ["--rows", "2", "--walk-mb", "--steps", "2", "--rounds", "1", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| 2 | after an idle gap |" in table and "walk of" not in table  # no walks asked
    assert [r["way"] for r in json.loads(out.read_text())] == [
        "back to back", "after an idle gap", "after a busy gap",
    ]  # fmt: skip

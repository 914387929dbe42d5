"""benchmarks.batch_invariance: a divergence is found at its first differing token and counted
once, and a small run on the bundled model draws the same seeded tokens run after run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import batch_invariance
from benchmarks.batch_invariance import generate, main, measure, parse_args
from benchmarks.inprocess import load_model

STORE = Path(__file__).resolve().parents[2] / "model_store"


def test_a_divergence_is_counted_at_its_first_differing_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = {
        False: [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]],
        True: [[1, 2, 3, 4], [5, 6, 0, 0], [0, 9, 9, 9]],
    }
    monkeypatch.setattr(batch_invariance, "load_model", lambda store, name: None)
    monkeypatch.setattr(batch_invariance, "products", lambda model: {})
    monkeypatch.setattr(
        batch_invariance, "generate", lambda model, s, t, temp, *, batched: runs[batched]
    )
    result = measure(parse_args(["--sessions", "3", "--tokens", "4"]))
    assert result["diverged"] == 2
    assert result["first_divergences"] == [0, 2]
    assert result["tokens_compared"] == 4 + 3 + 1  # up to and including each divergence


def test_seeded_sessions_draw_the_same_tokens_in_every_run_alone_or_batched() -> None:
    model = load_model(STORE, "bytes-lstm")
    vocab = model.config.input_dim
    once = generate(model, 3, 12, 1.0, batched=False)
    assert once == generate(model, 3, 12, 1.0, batched=False)
    assert generate(model, 3, 12, 1.0, batched=True) == generate(model, 3, 12, 1.0, batched=True)
    assert [len(t) for t in once] == [12, 12, 12]
    assert all(0 <= token < vocab for tokens in once for token in tokens)
    assert len({tuple(t) for t in once}) == 3  # each session its own stream


def test_main_prints_and_writes_the_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    args = ["--sessions", "2", "--tokens", "5", "--store", str(STORE), "--json", str(out)]
    assert main(args) == 0
    written = json.loads(out.read_text())
    assert written["sessions"] == 2 and written["tokens"] == 5
    assert written["tokens_compared"] <= 10
    assert set(written["rows_differ_at"]) <= set(batch_invariance.SIZES)
    assert sorted(written["product_us"]) == ["1", "2", "4", "8"]
    assert all(us > 0 for us in written["product_us"].values())
    printed = capsys.readouterr().out
    assert "alone against batched" in printed and "one layer's product" in printed

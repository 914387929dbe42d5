"""The bundled store, as a user gets it: every version verifies, `seqserve predict --json` agrees
with an independent NumPy transcription of the article's equations reading the safetensors by
the documented names, each model beats its trivial baseline, and one changed byte turns
`verify` red naming the file."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from service.cli.main import main
from service.settings import REPO_ROOT

STORE = REPO_ROOT / "model_store"


def _reference() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "models" / "reference.py"
    name = "seqserve_tests_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _manifest(name: str, version: int = 1) -> dict:
    return json.loads((STORE / name / str(version) / "manifest.json").read_text())


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["predict", "--store", str(STORE), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_shipped_store_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "verify", "--store", str(STORE)]) == 0
    out = capsys.readouterr().out
    assert "bytes-lstm" in out and "co2-gru" in out


def test_bytes_lstm_predict_matches_the_article_equations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = _reference()
    text = "def __init__(self, name):\n    self.name = name\n    return None\n"
    got = _predict(capsys, "--model", "bytes-lstm", "--text", text, "--top-k", "8")
    assert got["model"] == "bytes-lstm" and got["version"] == 1
    assert got["position"] == len(text.encode())
    weights = ref.load_safetensors(STORE / "bytes-lstm" / "1" / "weights.safetensors")
    ids = np.array([list(text.encode())])
    logits = ref.run_model(weights, _manifest("bytes-lstm"), ids).last[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    want = np.argsort(-probs)[:8]
    assert [t["id"] for t in got["top"]] == want.tolist()
    np.testing.assert_allclose([t["prob"] for t in got["top"]], probs[want], atol=1e-5)
    assert [t["text"] for t in got["top"]] == [bytes([i]).decode("utf-8", "replace") for i in want]


def test_co2_gru_predict_matches_the_article_equations(capsys: pytest.CaptureFixture[str]) -> None:
    ref = _reference()
    weeks = np.arange(12)
    phase = 2 * np.pi * (weeks * 7) / 365.25
    frames = np.stack([330.0 + 0.03 * weeks, np.sin(phase), np.cos(phase)], axis=1)  # [T, 3]
    flat = ",".join(f"{v:.6f}" for v in frames.reshape(-1))
    got = _predict(capsys, "--model", "co2-gru", "--frames", flat)
    assert got["position"] == len(weeks)
    weights = ref.load_safetensors(STORE / "co2-gru" / "1" / "weights.safetensors")
    manifest = _manifest("co2-gru")
    assert manifest["cell"] == "gru" and manifest["reset_after"] is False  # the article's GRU
    inputs = np.array([[[float(f"{v:.6f}") for v in row] for row in frames]])
    want = ref.run_model(weights, manifest, inputs).last[0]
    np.testing.assert_allclose(got["values"], want, atol=1e-4, rtol=1e-6)
    assert 320 < got["values"][0] < 345  # a ppm forecast near the input level


def test_shipped_models_beat_their_baselines() -> None:
    text = _manifest("bytes-lstm")["training"]
    assert text["validation"]["bits_per_byte"] < 0.5 * text["baselines"]["bits_per_byte"]
    series = _manifest("co2-gru")["training"]
    assert series["validation"]["mae_ppm"] < series["baselines"]["mae_ppm"]


def test_verify_names_a_weights_file_with_one_changed_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    shutil.copytree(STORE, store, ignore=shutil.ignore_patterns(".aliases.lock"))
    weights = store / "co2-gru" / "1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["models", "verify", "--store", str(store)]) != 0
    captured = capsys.readouterr()
    assert str(weights) in captured.out + captured.err

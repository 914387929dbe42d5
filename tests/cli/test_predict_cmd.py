"""`seqserve predict` against a store in tmp_path, checked against the published models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from service.cli.main import main
from service.cli.predict_cmd import join_negative_frames
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore

TEXT_CONFIG = ModelConfig(
    cell="lstm",
    num_layers=2,
    hidden_size=8,
    input_kind="tokens",
    input_dim=256,
    embed_dim=4,
    head_kind="classification",
    output_dim=256,
)
FRAME_CONFIG = ModelConfig(
    cell="gru",
    num_layers=1,
    hidden_size=8,
    input_kind="features",
    input_dim=3,
    embed_dim=4,
    head_kind="regression",
    output_dim=2,
    reset_after=False,
)


def _publish(store: ModelStore, name: str, config: ModelConfig, seed: int) -> SequenceModel:
    torch.manual_seed(seed)
    model = SequenceModel(config).eval()
    store.publish(
        name,
        config,
        model.state_dict(),
        description="test",
        training=Training(data="random", steps=0),
    )
    return model


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def text_models(store: ModelStore) -> dict[int, SequenceModel]:
    """bytes-lstm versions 1 and 2, production → 1."""
    models = {v: _publish(store, "bytes-lstm", TEXT_CONFIG, seed=v) for v in (1, 2)}
    store.set_alias("bytes-lstm", "production", 1)
    return models


@pytest.fixture
def frame_model(store: ModelStore) -> SequenceModel:
    return _publish(store, "co2-gru", FRAME_CONFIG, seed=7)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _expected_probs(model: SequenceModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))  # [1, T, V]
    return torch.softmax(logits[0, -1], dim=-1)


def test_token_prediction_json(
    store: ModelStore, text_models: dict[int, SequenceModel], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        capsys, "predict", "--model", "bytes-lstm", "--tokens", "72, 105,33",
        "--top-k", "4", "--json", "--store", str(store.root),
    )  # fmt: skip
    assert code == 0, err
    body = json.loads(out)
    assert list(body) == ["model", "version", "position", "top"]
    assert (body["model"], body["version"], body["position"]) == ("bytes-lstm", 1, 3)
    probs = _expected_probs(text_models[1], [72, 105, 33])
    expected_ids = torch.topk(probs, 4).indices.tolist()
    assert [t["id"] for t in body["top"]] == expected_ids
    for item in body["top"]:
        assert list(item) == ["id", "prob", "text"]
        assert item["prob"] == pytest.approx(probs[item["id"]].item(), rel=1e-5)
        assert item["text"] == bytes([item["id"]]).decode("utf-8", errors="replace")


def test_text_is_the_same_as_its_utf8_tokens(
    store: ModelStore, text_models: dict[int, SequenceModel], capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(store.root)
    text = "héllo\n"
    ids = ",".join(str(b) for b in text.encode())
    _, by_text, _ = _run(capsys, "predict", "--model", "bytes-lstm", "--text", text, "--json",
                         "--version", "2", "--store", root)  # fmt: skip
    _, by_ids, _ = _run(capsys, "predict", "--model", "bytes-lstm", "--tokens", ids, "--json",
                        "--version", "2", "--store", root)  # fmt: skip
    assert json.loads(by_text) == json.loads(by_ids)
    assert json.loads(by_text)["position"] == len(text.encode())
    probs = _expected_probs(text_models[2], list(text.encode()))
    assert json.loads(by_text)["top"][0]["id"] == int(probs.argmax())


def test_default_top_k_comes_from_settings(
    store: ModelStore,
    text_models: dict[int, SequenceModel],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEQSERVE_ENGINE__DEFAULT_TOP_K", "3")
    monkeypatch.setenv("SEQSERVE_MODEL_STORE", str(store.root))
    _, out, _ = _run(capsys, "predict", "--model", "bytes-lstm", "--text", "a", "--json")
    assert len(json.loads(out)["top"]) == 3


def test_regression_prediction_json(
    store: ModelStore, frame_model: SequenceModel, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = [0.1, 0.2, 0.3, -1.0, 0.5, 2.0]
    code, out, err = _run(
        capsys, "predict", "--model", "co2-gru", "--frames", ",".join(map(str, frames)),
        "--json", "--store", str(store.root),
    )  # fmt: skip
    assert code == 0, err
    body = json.loads(out)
    assert list(body) == ["model", "version", "position", "values"]
    assert (body["model"], body["version"], body["position"]) == ("co2-gru", 1, 2)
    with torch.no_grad():
        expected, _ = frame_model(torch.tensor(frames).view(1, 2, 3))  # [1, T, 2]
    assert body["values"] == pytest.approx(expected[0, -1].tolist(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("flag", ["--frames", "--fr"])  # argparse's abbreviation too
def test_frames_starting_with_a_negative_value_follow_the_flag(
    store: ModelStore,
    frame_model: SequenceModel,
    capsys: pytest.CaptureFixture[str],
    flag: str,
) -> None:
    """Normalised features are often negative: `--frames -0.5,...` as a separate argument is
    the flag's value, as `--frames=-0.5,...` is (argparse took it for an option and printed
    usage, exit 2)."""
    frames = [-0.5, 0.2, 0.3, -1.0, 0.5, 2.0]
    value = ",".join(map(str, frames))
    root = str(store.root)
    code, out, err = _run(capsys, "predict", "--model", "co2-gru", flag, value, "--json",
                          "--store", root)  # fmt: skip
    assert code == 0, err
    code, joined, err = _run(capsys, "predict", "--model", "co2-gru", f"--frames={value}",
                             "--json", "--store", root)  # fmt: skip
    assert code == 0, err
    assert json.loads(out) == json.loads(joined)
    with torch.no_grad():
        expected, _ = frame_model(torch.tensor(frames).view(1, 2, 3))  # [1, T, 2]
    assert json.loads(out)["values"] == pytest.approx(expected[0, -1].tolist(), rel=1e-5, abs=1e-6)
    code, out, err = _run(capsys, "predict", "--model", "co2-gru", "--frames", "-.5,0,0",
                          "--json", "--store", root)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["position"] == 1


def test_frames_then_an_option_is_still_a_missing_value(
    store: ModelStore, frame_model: SequenceModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a value that reads as a negative number is joined to `--frames`; an option after
    it is still an option, and `--frames` without its value a usage error."""
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--model", "co2-gru", "--frames", "--json", "--store", str(store.root)])
    assert exit_.value.code == 2
    assert "argument --frames: expected one argument" in capsys.readouterr().err


def test_only_frames_values_that_read_as_negative_numbers_are_joined() -> None:
    argv = ["predict", "--text", "-1", "--frames", "-1,2", "--f", "-e", "--", "--frames", "-3"]
    assert join_negative_frames(argv) == [
        "predict", "--text", "-1", "--frames=-1,2", "--f", "-e", "--", "--frames", "-3",
    ]  # fmt: skip


def test_human_output(
    store: ModelStore, text_models: dict[int, SequenceModel], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "predict", "--model", "bytes-lstm", "--text", "hi",
                        "--top-k", "2", "--store", str(store.root))  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "bytes-lstm version 1, position 2"
    assert lines[1].split() == ["RANK", "ID", "PROB", "TEXT"]
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "bytes-lstm", "--tokens", "1,256"], "token id 256 out of range"),
        (["--model", "bytes-lstm", "--tokens", "1,,2"], "--tokens expects comma-separated"),
        (["--model", "bytes-lstm", "--tokens", "1.5"], "--tokens: invalid literal"),
        (["--model", "bytes-lstm", "--text", ""], "--text is empty"),
        (["--model", "bytes-lstm", "--frames", "0.1,0.2,0.3"], "takes tokens"),
        (["--model", "bytes-lstm", "--text", "a", "--top-k", "0"], "--top-k must be at least 1"),
        (["--model", "co2-gru", "--text", "abc"], "takes frames of 3 floats"),
        (["--model", "co2-gru", "--tokens", "1,2,3"], "takes frames of 3 floats"),
        (["--model", "co2-gru", "--frames", "0.1,0.2"], "2 values, not a multiple of"),
        (["--model", "co2-gru", "--frames", "1,2,nan"], "must be finite"),
        (["--model", "co2-gru", "--frames", "1e300,1,2"], "must be finite numbers (as float32)"),
        (["--model", "co2-gru", "--frames", "1e16,1,2"], "must be within ±1e+15"),
        (["--model", "co2-gru", "--frames", "1,-1e16,2"], "must be within ±1e+15"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    store: ModelStore,
    text_models: dict[int, SequenceModel],
    frame_model: SequenceModel,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    code, out, err = _run(capsys, "predict", *argv, "--store", str(store.root))
    assert code == 2
    assert message in err
    assert out == ""


@pytest.mark.parametrize("raw", [b"\xff", b"caf\xe9 au lait"])
def test_text_that_is_not_utf8_exits_2_with_one_line(
    store: ModelStore,
    text_models: dict[int, SequenceModel],
    capsys: pytest.CaptureFixture[str],
    raw: bytes,
) -> None:
    """Bytes that are not UTF-8 on the command line reach Python as surrogate escapes (what
    os.fsdecode gives): refused as the server refuses text that is not UTF-8, one line and
    exit 2 (it was a traceback ending in UnicodeEncodeError, exit 1)."""
    text = os.fsdecode(raw)
    code, out, err = _run(capsys, "predict", "--model", "bytes-lstm", "--text", text,
                          "--store", str(store.root))  # fmt: skip
    assert (code, out) == (2, "")
    assert err.startswith("error: --text is not UTF-8"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("model", "version", "message"),
    [
        ("nope", "", "model 'nope' not found; available: bytes-lstm, co2-gru"),
        ("bytes-lstm", "9", "version 9 of 'bytes-lstm' not found; versions: 1, 2"),
        ("bytes-lstm", "canary", "alias 'canary' of 'bytes-lstm' not found; aliases: production"),
    ],
)
def test_unknown_model_version_or_alias_exits_1(
    store: ModelStore,
    text_models: dict[int, SequenceModel],
    frame_model: SequenceModel,
    capsys: pytest.CaptureFixture[str],
    model: str,
    version: str,
    message: str,
) -> None:
    code, _, err = _run(capsys, "predict", "--model", model, "--version", version,
                        "--text", "a", "--store", str(store.root))  # fmt: skip
    assert code == 1
    assert message in err


def test_tampered_weights_are_refused(
    store: ModelStore, text_models: dict[int, SequenceModel], capsys: pytest.CaptureFixture[str]
) -> None:
    path = store.root / "bytes-lstm" / "1" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = _run(capsys, "predict", "--model", "bytes-lstm", "--text", "a",
                        "--store", str(store.root))  # fmt: skip
    assert code == 1
    assert "bytes-lstm/1/weights.safetensors: sha256 mismatch" in err  # named within --store


def test_a_device_torch_does_not_have_exits_2_with_a_message(
    store: ModelStore,
    text_models: dict[int, SequenceModel],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEQSERVE_ENGINE__DEVICE", "cuda:99")  # none has it, CUDA or not
    argv = ("predict", "--model", "bytes-lstm", "--text", "a", "--store", str(store.root))
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("seqserve: invalid setting engine.device (--engine.device, ")
    assert "cuda:99 is not available" in err and len(err.strip().splitlines()) == 1


def test_latest_skips_a_newest_version_whose_weights_fail_as_the_server_does(
    store: ModelStore, text_models: dict[int, SequenceModel], capsys: pytest.CaptureFixture[str]
) -> None:
    """Version 2's weights fail their digest: "latest" (and the default, with no production
    alias) is version 1, as on a server; `models list` says so. It failed with the digest
    error, exit 1, and listed 2 as latest."""
    weights = store.root / "bytes-lstm" / "2" / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    root = str(store.root)
    code, out, err = _run(capsys, "predict", "--model", "bytes-lstm", "--tokens", "72",
                          "--version", "latest", "--json", "--store", root)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    store.delete_alias("bytes-lstm", "production")
    code, out, err = _run(capsys, "predict", "--model", "bytes-lstm", "--tokens", "72", "--json",
                          "--store", root)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    code, out, _ = _run(capsys, "models", "list", "--store", root)
    (row,) = [line.split("  ") for line in out.splitlines() if line.startswith("bytes-lstm")]
    assert [c.strip() for c in row if c.strip()][2:4] == ["1", "1"], out  # VERSIONS, LATEST
    code, _, err = _run(capsys, "predict", "--model", "bytes-lstm", "--tokens", "72",
                        "--version", "2", "--store", root)  # fmt: skip
    assert code == 1 and "sha256" in err  # asked for by number: not skipped

"""Importing torch.save(state_dict) checkpoints of real nn.LSTM / nn.GRU modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from service.errors import InvalidArgument, InvalidCheckpoint
from service.registry.checkpoint_import import ImportSpec
from service.registry.store import ModelStore

from .conftest import outputs, sample_inputs, seeded_model, small_config


class CharLSTM(nn.Module):
    """How a user might write a byte model: module names differ from ours."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 6)
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))  # [B, T, H]
        return self.fc(out[:, -1])  # [B, 256]


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_import_user_lstm_with_renamed_modules(store: ModelStore, tmp_path: Path) -> None:
    torch.manual_seed(0)
    user = CharLSTM().eval()
    ckpt = _save(user.state_dict(), tmp_path / "char_lstm.pt")
    spec = ImportSpec(rename_prefixes=(("embed.", "embedding."), ("fc.", "head.")))
    manifest = store.import_checkpoint("char", ckpt, spec)

    assert (manifest.name, manifest.version, manifest.cell) == ("char", 1, "lstm")
    assert (manifest.num_layers, manifest.hidden_size) == (2, 8)
    assert manifest.input.kind == "tokens" and manifest.head.kind == "classification"
    assert manifest.training.data == "imported from char_lstm.pt"
    loaded = store.load("char", 1)
    tokens = torch.tensor([[72, 105, 33, 10]])
    with torch.no_grad():
        expected = user(tokens)
    torch.testing.assert_close(outputs(loaded.model, tokens), expected)


def test_import_bare_gru_with_input_and_head_saved_alongside(
    store: ModelStore, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    proj, gru, head = nn.Linear(3, 5), nn.GRU(5, 8, batch_first=True), nn.Linear(8, 2)
    state = {
        **gru.state_dict(),  # bare nn.GRU keys: weight_ih_l0, …
        "input_proj.weight": proj.weight,
        "input_proj.bias": proj.bias,
        "head.weight": head.weight,
        "head.bias": head.bias,
    }
    ckpt = _save(state, tmp_path / "gru.pt")
    manifest = store.import_checkpoint("frames", ckpt, ImportSpec(description="from a GRU"))

    assert (manifest.cell, manifest.reset_after) == ("gru", True)
    assert manifest.input.kind == "features" and manifest.input.dim == 3
    assert manifest.head.kind == "regression" and manifest.head.dim == 2
    assert manifest.description == "from a GRU"
    frames = torch.randn(1, 6, 3)
    with torch.no_grad():
        out, _ = gru(proj(frames))
        expected = head(out[:, -1])
    torch.testing.assert_close(outputs(store.load("frames", 1).model, frames), expected)


@pytest.mark.parametrize("reset_after", [True, False], ids=["torch-gru", "article-gru"])
def test_import_full_sequence_model_state_dict(
    store: ModelStore, tmp_path: Path, reset_after: bool
) -> None:
    config = small_config("gru", "tokens", reset_after=reset_after)
    original = seeded_model(config, seed=3)
    ckpt = _save(original.state_dict(), tmp_path / "full.pt")
    manifest = store.import_checkpoint("full", ckpt, ImportSpec(reset_after=reset_after))
    assert manifest.to_config() == config
    inputs = sample_inputs(config)
    torch.testing.assert_close(
        outputs(store.load("full", 1).model, inputs), outputs(original, inputs)
    )


def test_state_dict_nested_under_a_key(store: ModelStore, tmp_path: Path) -> None:
    state = seeded_model(small_config("lstm")).state_dict()
    ckpt = _save({"epoch": 3, "model": state}, tmp_path / "train.pt")
    with pytest.raises(InvalidCheckpoint, match=r"not tensors: epoch, model.*--key"):
        store.import_checkpoint("m", ckpt)
    assert store.import_checkpoint("m", ckpt, ImportSpec(key="model")).version == 1


def test_bare_lstm_without_input_layer_explains_what_is_needed(
    store: ModelStore, tmp_path: Path
) -> None:
    ckpt = _save(nn.LSTM(6, 8).state_dict(), tmp_path / "lstm.pt")
    with pytest.raises(InvalidCheckpoint) as info:
        store.import_checkpoint("m", ckpt)
    message = info.value.message
    assert str(ckpt) in message
    assert "'embedding.weight' [vocab_size, 6]" in message
    assert "'input_proj.weight' [6, frame_dim]" in message
    assert store.snapshot().models == {}  # nothing published, no random weights invented


def test_missing_head_explains_what_is_needed(store: ModelStore, tmp_path: Path) -> None:
    state = {**nn.LSTM(6, 8).state_dict(), "embedding.weight": torch.randn(256, 6)}
    ckpt = _save(state, tmp_path / "nohead.pt")
    with pytest.raises(InvalidCheckpoint, match=r"no head.*'head\.weight' \[outputs, 8\]"):
        store.import_checkpoint("m", ckpt)


def test_leftover_tensors_are_refused(store: ModelStore, tmp_path: Path) -> None:
    state = {**seeded_model(small_config("lstm")).state_dict(), "aux.weight": torch.zeros(2)}
    ckpt = _save(state, tmp_path / "extra.pt")
    with pytest.raises(InvalidCheckpoint, match=r"not part of the model: aux\.weight"):
        store.import_checkpoint("m", ckpt)


def test_bidirectional_rnn_is_refused(store: ModelStore, tmp_path: Path) -> None:
    ckpt = _save(nn.GRU(4, 8, bidirectional=True).state_dict(), tmp_path / "bi.pt")
    with pytest.raises(InvalidCheckpoint, match="bidirectional"):
        store.import_checkpoint("m", ckpt)


def test_classification_head_must_cover_the_vocabulary(store: ModelStore, tmp_path: Path) -> None:
    config = small_config("lstm", "tokens", head_kind="regression")
    ckpt = _save(seeded_model(config).state_dict(), tmp_path / "reg.pt")
    with pytest.raises(InvalidCheckpoint, match="classification is over the input vocabulary"):
        store.import_checkpoint("m", ckpt, ImportSpec(head_kind="classification"))
    assert store.import_checkpoint("m", ckpt).head.kind == "regression"


class _NotWeights:
    """Anything beyond tensors and containers must not be unpickled."""


def test_arbitrary_pickled_objects_are_not_loaded(store: ModelStore, tmp_path: Path) -> None:
    ckpt = _save({"payload": _NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(InvalidCheckpoint) as info:
        store.import_checkpoint("m", ckpt)
    message = str(info.value)
    assert "holds more than tensors and plain containers: refused, none of it was run" in message
    assert "\n" not in message and "weights_only" not in message  # one line, no unsafe advice


def test_a_file_that_is_no_checkpoint_is_one_line(store: ModelStore, tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello world")
    with pytest.raises(InvalidCheckpoint, match=r"notes.pt: not a torch checkpoint \(") as info:
        store.import_checkpoint("m", text)
    assert "\n" not in str(info.value)


def test_missing_file(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidCheckpoint, match="no such file"):
        store.import_checkpoint("m", tmp_path / "absent.pt")


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("rnn.weight_hh_l0", torch.zeros(3), r"weight_hh_l0 has shape \[3\]: not an LSTM"),
        ("rnn.weight_hh_l0", torch.zeros(0, 0), r"weight_hh_l0 has shape \[0, 0\]: not an LSTM"),
        ("rnn.weight_ih_l0", torch.zeros(32), r"weight_ih_l0 has shape \[32\]: expected a matrix"),
        ("embedding.weight", torch.zeros(256), r"embedding\.weight has shape \[256\]: expected"),
        ("head.weight", torch.zeros(0, 8), r"head\.weight has shape \[0, 8\]: expected a matrix"),
    ],
)
def test_tensors_of_the_wrong_rank_are_refused_by_name(
    store: ModelStore, tmp_path: Path, name: str, tensor: torch.Tensor, message: str
) -> None:
    """The architecture is read off these tensors' widths: a vector or an empty matrix where a
    matrix belongs is a bad checkpoint, not a crash."""
    state = {**seeded_model(small_config("lstm")).state_dict(), name: tensor}
    ckpt = _save(state, tmp_path / "bad.pt")
    with pytest.raises(InvalidCheckpoint, match=message):
        store.import_checkpoint("m", ckpt)
    assert store.snapshot().models == {}


def test_negative_training_steps_are_an_invalid_argument(store: ModelStore, tmp_path: Path) -> None:
    """Not a pydantic ValidationError from the manifest's Training: a SeqServeError whose one
    line the CLI prints, and nothing published."""
    ckpt = _save(seeded_model(small_config(), 0).state_dict(), tmp_path / "m.pt")
    with pytest.raises(InvalidArgument, match="training steps must be >= 0, got -1"):
        store.import_checkpoint("m", ckpt, ImportSpec(steps=-1))
    assert "m" not in store.snapshot().models
    assert store.import_checkpoint("m", ckpt, ImportSpec(steps=0)).training.steps == 0

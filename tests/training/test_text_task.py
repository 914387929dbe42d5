"""Byte LM training: stateful batches, the bits-per-byte figure, a tiny seeded run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from service.errors import InvalidArgument
from service.models import SequenceModel
from service.training.text_corpus import TextCorpus, load_text_corpus, unigram_bits_per_byte
from service.training.text_task import ByteTracks, bits_per_byte, text_model_config, train_text
from service.training.trainer import TrainOptions

TINY = TrainOptions(
    cell="lstm", reset_after=True, num_layers=1, hidden_size=8, embed_dim=4, steps=3,
    batch_size=4, seq_len=16, lr=1e-2, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def corpus() -> TextCorpus:
    return load_text_corpus()


def test_byte_tracks_are_contiguous_and_wrap_with_a_reset() -> None:
    data = np.arange(100, dtype=np.uint8)
    tracks = ByteTracks(data, batch=2, seq_len=10)  # two tracks of 50 bytes
    first_x, first_y, wrapped = tracks.next()
    assert not wrapped
    assert first_x[1, 0].item() == 50  # track 1 starts half way through
    assert torch.equal(first_y[:, :-1], first_x[:, 1:])  # targets are inputs one byte on
    second_x, _, _ = tracks.next()
    assert torch.equal(second_x[:, 0], first_y[:, -1])  # the next step continues the track
    for _ in range(2):
        tracks.next()
    _, _, wrapped = tracks.next()  # 5th window would need bytes 40..50 of a 50-byte track
    assert wrapped
    with pytest.raises(InvalidArgument):
        ByteTracks(data, batch=10, seq_len=10)


def test_a_uniform_model_scores_eight_bits_per_byte() -> None:
    model = SequenceModel(text_model_config(TINY))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    data = np.frombuffer(b"def f(x):\n    return x\n" * 40, dtype=np.uint8)
    assert bits_per_byte(model, data, tracks=4) == pytest.approx(8.0, abs=1e-5)


def test_bits_per_byte_is_the_mean_cross_entropy_of_every_scored_byte() -> None:
    torch.manual_seed(0)
    model = SequenceModel(text_model_config(TINY))
    data = np.frombuffer(b"import os\nprint(os.sep)\n" * 30, dtype=np.uint8)
    stream = torch.from_numpy(data.astype(np.int64)).view(1, -1)
    with torch.no_grad():
        logits, _ = model(stream[:, :-1])  # one track, one pass
        nats = torch.nn.functional.cross_entropy(logits[0], stream[0, 1:])
    assert bits_per_byte(model, data, tracks=1) == pytest.approx(
        float(nats) / math.log(2), rel=1e-5
    )


def test_tiny_run_is_repeatable_and_reports_model_and_baseline(corpus: TextCorpus) -> None:
    first = train_text(TINY, corpus, progress=False, max_eval_bytes=2048)
    second = train_text(TINY, corpus, progress=False, max_eval_bytes=2048)
    other = train_text(
        TrainOptions(**{**TINY.__dict__, "seed": 4}), corpus, progress=False, max_eval_bytes=2048
    )
    assert first.state_dict.keys() == second.state_dict.keys()
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert not torch.equal(first.state_dict["head.weight"], other.state_dict["head.weight"])
    assert first.validation == second.validation
    assert first.validation.keys() == first.baselines.keys() == {"bits_per_byte"}
    assert 0 < first.validation["bits_per_byte"] < 9
    assert first.baselines["bits_per_byte"] == pytest.approx(
        unigram_bits_per_byte(corpus.train, corpus.validation[:2048])
    )
    assert math.isfinite(first.final_loss)
    assert corpus.sha256 in first.data and "2048 bytes" in first.data


def test_training_lowers_validation_bits_on_a_small_corpus(tmp_path: Path) -> None:
    text = b"for item in items:\n    total += item.price * item.count\n"
    for k in range(10):
        (tmp_path / f"m{k}.py").write_bytes(text * 20)
    small = load_text_corpus(tmp_path, [f"m{k}.py" for k in range(10)])
    options = TrainOptions(**{**TINY.__dict__, "hidden_size": 32, "steps": 60, "lr": 2e-2})
    untrained = bits_per_byte(SequenceModel(text_model_config(options)), small.validation)
    trained = train_text(options, small, progress=False)
    assert trained.validation["bits_per_byte"] < min(untrained, trained.baselines["bits_per_byte"])

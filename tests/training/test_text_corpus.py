"""The stdlib byte corpus: pinned files, a deterministic disjoint split, the unigram baseline."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from service.errors import FailedPrecondition
from service.training.text_corpus import (
    STDLIB_FILES,
    VALIDATION_EVERY,
    load_text_corpus,
    split_by_file,
    unigram_bits_per_byte,
)


def test_split_is_disjoint_complete_and_independent_of_input_order() -> None:
    files = [f"m{k:02d}.py" for k in range(25)]
    train, validation = split_by_file(files)
    assert set(train).isdisjoint(validation)
    assert sorted(train + validation) == sorted(files)
    assert len(validation) == len(files) // VALIDATION_EVERY
    assert split_by_file(list(reversed(files))) == (train, validation)


def test_stdlib_corpus_holds_out_whole_files(tmp_path: Path) -> None:
    corpus = load_text_corpus()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert set(corpus.train_files).isdisjoint(corpus.validation_files)
    assert set(corpus.train_files) | set(corpus.validation_files) == set(STDLIB_FILES)
    assert corpus.train.size == sum((root / f).stat().st_size for f in corpus.train_files)
    assert corpus.validation.size == sum((root / f).stat().st_size for f in corpus.validation_files)
    first = (root / corpus.validation_files[0]).read_bytes()
    assert corpus.validation[: len(first)].tobytes() == first
    again = load_text_corpus()
    assert again.sha256 == corpus.sha256
    assert np.array_equal(again.train, corpus.train)
    description = corpus.describe()
    assert corpus.sha256 in description and corpus.validation_files[0] in description


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    for k in range(VALIDATION_EVERY):
        (tmp_path / f"m{k}.py").write_bytes(b"x = 1\n")
    files = [f"m{k}.py" for k in range(VALIDATION_EVERY)]
    assert load_text_corpus(tmp_path, files).validation.tobytes() == b"x = 1\n"
    with pytest.raises(FailedPrecondition, match="missing"):
        load_text_corpus(tmp_path, [*files, "absent.py"])


def test_unigram_baseline_is_the_smoothed_cross_entropy() -> None:
    train = np.array([0, 0, 0, 1], dtype=np.uint8)
    validation = np.array([0, 1, 2], dtype=np.uint8)
    total = 4 + 256  # counts plus add-one smoothing over the 256 byte values
    expected = -(math.log2(4 / total) + math.log2(2 / total) + math.log2(1 / total)) / 3
    assert unigram_bits_per_byte(train, validation) == pytest.approx(expected)
    uniform = np.arange(256, dtype=np.uint8)
    assert unigram_bits_per_byte(uniform, uniform) == pytest.approx(8.0)

"""Records written by this version of the server (committed fixtures, format version 1) must
stay readable by every later one: a server upgraded in place recovers the sessions its
predecessor journaled and checkpointed. Change a format only by adding a version; never edit
these files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime.sampler import SamplingParams, SessionRng
from service.sessions import journal_record as jr
from service.sessions import spill_record

FIXTURES = Path(__file__).parent / "fixtures"
SID = "s_fixtureFormatV1xxxxxx"


def test_a_version_1_journal_segment_reads_back() -> None:
    records = list(jr.decode_stream((FIXTURES / "journal-v1.log").read_bytes()))
    assert [r.kind for r in records] == [jr.CREATE, jr.TOKENS, jr.GENERATED, jr.FRAMES, jr.END]
    create, fed, sampled, frames, end = records
    assert create.session_id == SID and create.meta is not None
    assert create.meta["seed"] == 42 and create.meta["default_sampling"]["stop_strings"] == ["\n"]
    assert fed.tokens is not None and (fed.position, fed.tokens.tolist()) == (0, [104, 105])
    assert sampled.tokens is not None
    assert (sampled.position, sampled.tokens.tolist(), sampled.draws) == (2, [33], 1)
    assert frames.frames is not None and frames.frames.tolist() == [0.25, -0.5, 1.0]
    assert (end.position, end.why) == (3, "closed")


def test_a_version_1_spill_record_reads_back() -> None:
    path = FIXTURES / "spill-v1.spill"
    record = spill_record.decode(path.read_bytes(), str(path))
    header = record.header
    assert (header.session_id, header.position, header.fingerprint) == (SID, 3, "0123456789abcdef")
    assert header.default_sampling == SamplingParams(
        temperature=0.5, top_k=3, stop_strings=("\n",), max_tokens=8
    )
    rng = SessionRng.seeded(42)
    rng.uniform()
    assert SessionRng.from_state(header.rng_state).uniform() == rng.uniform()
    assert record.state.c is not None
    np.testing.assert_array_equal(record.state.h, [[0.5, -0.25]])
    np.testing.assert_array_equal(record.state.c, [[1.0, 2.0]])
    np.testing.assert_array_equal(record.state.last, np.array([0.1, 0.2, 0.3], np.float32))

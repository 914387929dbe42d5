"""Records written by earlier versions of the server (committed fixtures: journal version 1,
spill versions 1, 2 and 3) must stay readable by every later one: a server upgraded in place
recovers the sessions its predecessor journaled and checkpointed. Change a format only by adding
a version; never edit these files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from service.runtime.sampler import SamplingParams, SessionRng
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions import spill_record

FIXTURES = Path(__file__).parent / "fixtures"
SID = "s_fixtureFormatV1xxxxxx"


def test_a_version_1_journal_segment_reads_back() -> None:
    records = list(js.decode_stream((FIXTURES / "journal-v1.log").read_bytes()))
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
    np.testing.assert_array_equal(
        record.state.c, [[1.0, 2.0]]
    )  # its `last` [0.1, 0.2, 0.3]: read past


@pytest.mark.parametrize(
    ("name", "built"), [("spill-v2.spill", True), ("spill-v3.spill", False)], ids=["v2", "v3"]
)
def test_version_2_and_3_spill_records_read_back_with_their_owner(name: str, built: bool) -> None:
    """Version 2 added the owner block; version 3 keeps no head output after the state, and
    may keep a random stream not drawn from since its seed as `{"seed", "draws"}` (this one:
    seed 42, one draw), read back as that stream and still unbuilt. Both fixtures hold the
    version-1 fixture's session, owned by alice."""
    path = FIXTURES / name
    data = path.read_bytes()
    assert data[:8] == (b"SQSPILL2" if built else b"SQSPILL3")
    record = spill_record.decode(data, str(path))
    header = record.header
    assert (header.session_id, header.position, header.owner) == (SID, 3, "alice")
    rng = SessionRng.seeded(42)
    rng.uniform()
    read_back = SessionRng.from_state(header.rng_state)
    assert read_back.built == built
    assert [read_back.uniform() for _ in range(3)] == [rng.uniform() for _ in range(3)]
    np.testing.assert_array_equal(record.state.c, [[1.0, 2.0]])  # type: ignore[arg-type]
    prefix = io.BytesIO(data)
    length, _ = spill_record.read_prefix(prefix.read)
    state_floats = (len(data) - 32 - prefix.tell() - length) // 4  # less the digest and header
    # Version 2: h, c and `last` (3 floats, read past); version 3: h and c.
    assert state_floats == (2 + 2 + 3 if built else 2 + 2)
    np.testing.assert_array_equal(record.state.h, [[0.5, -0.25]])

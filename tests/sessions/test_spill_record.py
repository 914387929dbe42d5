"""The spill record format: a faithful round trip, and any damage refused."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from service.errors import SpillCorrupted
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.state_pool import SlotSnapshot
from service.sessions import spill_record
from service.sessions.spill_record import SpillHeader, SpillRecord


def make_record(lstm: bool = True, position: int = 12) -> SpillRecord:
    rng = SessionRng.seeded(2**62 + 11)
    rng.uniform()  # mid-stream: the state is not just the seed
    gen = np.random.default_rng(0)
    header = SpillHeader(
        session_id="s_abcDEF-_123",
        model="tok",
        version=3,
        fingerprint="0123456789abcdef",
        position=position,
        seed=2**62 + 11,
        parent_session_id="s_parent",
        created_at=1.7e9,
        ttl_seconds=600.0,
        last_used_wall=1.7e9 + 5,
        rng_state=rng.get_state(),
        default_sampling=SamplingParams(
            temperature=0.5, top_k=3, stop_strings=("\n",), stop_token_ids=(0,)
        ),
        num_layers=2,
        hidden_size=4,
        has_cell_state=lstm,
        output_dim=5,
    )
    state = SlotSnapshot(
        h=gen.standard_normal((2, 4)).astype(np.float32),
        c=gen.standard_normal((2, 4)).astype(np.float32) if lstm else None,
    )
    return SpillRecord(header, state)


@pytest.mark.parametrize("lstm", [True, False], ids=["lstm", "gru"])
def test_round_trip_is_exact(lstm: bool) -> None:
    record = make_record(lstm)
    back = spill_record.decode(spill_record.encode(record), "mem")
    assert back.header == record.header
    np.testing.assert_array_equal(back.state.h, record.state.h)
    if lstm:
        assert back.state.c is not None and record.state.c is not None
        np.testing.assert_array_equal(back.state.c, record.state.c)
    else:
        assert back.state.c is None
    # The RNG continues exactly where it was, and the sampling defaults come back typed.
    a = SessionRng.from_state(back.header.rng_state)
    b = SessionRng.from_state(record.header.rng_state)
    assert [a.uniform() for _ in range(5)] == [b.uniform() for _ in range(5)]
    assert back.header.default_sampling == record.header.default_sampling
    assert isinstance(back.header.default_sampling.stop_strings, tuple)
    assert back.state.h.flags.writeable  # torch.from_numpy needs writable arrays


def test_header_is_plain_json() -> None:
    data = spill_record.encode(make_record())
    stream = io.BytesIO(data)
    length, owner = spill_record.read_prefix(stream.read)
    header = json.loads(stream.read(length))
    assert header["session_id"] == "s_abcDEF-_123" and header["position"] == 12
    assert owner == ""  # made with auth off


def test_the_owner_stays_readable_when_the_rest_is_damaged() -> None:
    """A flipped byte anywhere after the owner block: the record is refused, and the error still
    says whose it was (so only they are told it is lost); a damaged owner block says nobody."""
    record = make_record()
    record.header.owner = "alice"
    data = spill_record.encode(record)
    owner_end = len(spill_record.MAGIC) + 2 + len(b"alice") + 4
    for at in (owner_end + 3, len(data) // 2, len(data) - 1):
        damaged = bytearray(data)
        damaged[at] ^= 0x01
        with pytest.raises(SpillCorrupted) as err:
            spill_record.decode(bytes(damaged), "mem")
        assert err.value.owner == "alice", at
    damaged = bytearray(data)
    damaged[len(spill_record.MAGIC) + 3] ^= 0x01  # inside the name: its own CRC fails
    with pytest.raises(SpillCorrupted) as err:
        spill_record.decode(bytes(damaged), "mem")
    assert err.value.owner == ""


def test_every_single_byte_flip_is_refused() -> None:
    data = spill_record.encode(make_record(lstm=False))
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        with pytest.raises(SpillCorrupted):
            spill_record.decode(bytes(damaged), "mem")


@pytest.mark.parametrize("cut", [0, 5, 12, 100, -1])
def test_truncation_is_refused(cut: int) -> None:
    data = spill_record.encode(make_record())
    with pytest.raises(SpillCorrupted):
        spill_record.decode(data[:cut], "mem")


def test_consistent_but_wrong_sized_state_is_refused() -> None:
    """A record whose checksum is right but whose arrays do not fit its header."""
    data = spill_record.encode(make_record())
    body = data[: -spill_record.DIGEST_BYTES - 4]  # one float short
    with pytest.raises(SpillCorrupted, match="bytes of state"):
        spill_record.decode(body + hashlib.sha256(body).digest(), "mem")


def test_header_rejects_unknown_fields_and_bad_ids() -> None:
    good = make_record().header.model_dump()
    with pytest.raises(ValueError):
        SpillHeader.model_validate({**good, "pickle": "no"})
    with pytest.raises(ValueError):
        SpillHeader.model_validate({**good, "session_id": "../../etc/passwd"})


def test_an_unreadable_header_is_one_line_naming_its_field() -> None:
    """The message reaches a client as DATA_LOSS details: it was pydantic's multi-line dump
    ("1 validation error for SpillHeader\\nsession_id\\n  String should match pattern…"),
    with the header's own bytes quoted in it."""
    good = make_record().header.model_dump()
    raw = json.dumps({**good, "session_id": "../../etc/passwd"}).encode()
    with pytest.raises(SpillCorrupted) as refused:
        spill_record.parse_header(raw, "its spill record")
    assert str(refused.value) == "its spill record: unreadable header (session_id)"
    with pytest.raises(SpillCorrupted, match=r"^its spill record: unreadable header \(its JSON\)$"):
        spill_record.parse_header(b"{not json", "its spill record")

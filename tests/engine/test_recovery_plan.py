"""What recovery plans for one session: whether it needs a replay or only a check, and when
its journal holds a whole history that can rebuild a damaged checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from service.engine.recovery_plan import (
    Plan,
    damage,
    fresh_session,
    needs_replay,
    only_checked,
    whole_history,
)
from service.engine.replay_plan import replay_of
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js

SID = "s_" + "a" * 32


def _meta(fingerprint: str = "fp-1") -> dict[str, Any]:
    return {"model": "tok", "version": 1, "fingerprint": fingerprint, "seed": 7,
            "ttl_seconds": 60.0, "created_at": 1.0}  # fmt: skip


def _read(*records: bytes) -> list[jr.JournalRecord]:
    return list(js.decode_stream(b"".join(records)))


def _steps(*counts: int) -> list[jr.JournalRecord]:
    out, position = [], 0
    for n in counts:
        out.append(jr.tokens(SID, position, np.arange(n, dtype=np.int64)))
        position += n
    return _read(*out)


def _checkpointed(position: int, records: list[jr.JournalRecord], **kw: Any) -> Plan:
    session = dataclasses.replace(fresh_session(SID, _meta(), 0.0), position=position)
    return Plan(session, fresh=False, records=records, **kw)


def test_a_checkpoint_holding_every_step_needs_nothing_unless_its_history_is_there() -> None:
    records = _steps(2, 3)  # positions 0..5, the checkpoint at 5
    assert not needs_replay(_checkpointed(5, records))
    (create,) = _read(jr.create(SID, _meta()))
    with_history = _checkpointed(5, records, create=create)
    assert needs_replay(with_history) and only_checked(with_history)
    assert needs_replay(_checkpointed(2, records)) and not only_checked(_checkpointed(2, records))


def test_a_generation_start_alone_is_no_step() -> None:
    started = _read(jr.generation_start(SID, 5, "r", {"temperature": 1.0}))
    assert not needs_replay(_checkpointed(5, _steps(2, 3) + started))


def test_a_whole_history_rebuilds_only_what_it_fully_covers() -> None:
    records = _steps(2, 3)
    (create,) = _read(jr.create(SID, _meta()))
    replay = replay_of(records, 5, "tokens", 1)
    found = whole_history(_checkpointed(5, records, create=create), replay, "tokens", 1)
    assert found is not None and (found.base, found.end) == (0, 5)
    # no CREATE (a fork's child): its first checkpoint is its history
    assert whole_history(_checkpointed(5, records), replay, "tokens", 1) is None
    # a CREATE for other weights
    (other,) = _read(jr.create(SID, _meta("fp-2")))
    assert whole_history(_checkpointed(5, records, create=other), replay, "tokens", 1) is None
    # a gap: the step at position 2 lost
    gapped = [records[0]]
    assert whole_history(_checkpointed(5, gapped, create=create), replay, "tokens", 1) is None


def test_the_damage_message_names_the_position() -> None:
    bad = js.Unreadable(10, js.DAMAGED, SID, 4, jr.TOKENS)
    assert "position 4" in damage(bad) and "damaged" in damage(bad)

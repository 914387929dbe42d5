"""What recovery plans for one session: whether it needs a replay or only a check, and when
its journal holds a whole history that can rebuild a damaged checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from service.engine.generation import GeneratedToken, GenerationLog
from service.engine.recovery_plan import (
    Plan,
    damage,
    fresh_session,
    needs_replay,
    only_checked,
    whole_history,
)
from service.engine.replay_plan import replay_of
from service.runtime.sampler import SamplingParams
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions.session import AppliedRequest

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


def _checkpointed_generation(finished: bool = False) -> AppliedRequest:
    """Generation "g" from position 5, its tokens 65..67 reaching 6..8: a checkpoint at 8."""
    tokens = [GeneratedToken(65 + i, chr(65 + i), 6 + i, None) for i in range(3)]
    return AppliedRequest("g", 5, GenerationLog(SamplingParams(max_tokens=9), tokens, finished))


def _generated(request_id: str, *tokens: tuple[int, int]) -> list[jr.JournalRecord]:
    return _read(*(jr.generated(SID, at, token, 1, request_id) for at, token in tokens))


def test_a_retry_going_on_with_a_checkpointed_generation_stays_its_last_request() -> None:
    """A checkpoint at 8 holds generation g unfinished; its retry's tokens follow, journaled
    with no GEN_START of their own: the last request is g, its tokens the checkpoint's then
    theirs (only GENERATED records of g at the base go on with it)."""
    held = _checkpointed_generation()
    sampling = SamplingParams(max_tokens=9).as_dict()
    going_on = _generated("g", (8, 70), (9, 71))
    replay = replay_of(going_on, 8, "tokens", 1, held)
    assert replay.last == ("generate", "g", 5, sampling, [65, 66, 67, 70, 71], 6)
    assert (replay.end, replay.draws) == (10, 2)
    # without the checkpoint's request (as before): no last request to answer a retry
    assert replay_of(going_on, 8, "tokens", 1).last is None
    # another request's tokens, a finished generation, or one that does not reach the base
    assert replay_of(_generated("h", (8, 70)), 8, "tokens", 1, held).last is None
    finished = _checkpointed_generation(finished=True)
    assert replay_of(going_on, 8, "tokens", 1, finished).last is None
    assert replay_of(_generated("g", (9, 70)), 9, "tokens", 1, held).last is None
    # a new generation under the same id (its own GEN_START) is its own last request
    started = _read(jr.generation_start(SID, 8, "g", sampling))
    again = replay_of(started + _generated("g", (8, 70)), 8, "tokens", 1, held)
    assert again.last is not None
    assert (again.last[:3], again.last[4:]) == (("generate", "g", 8), ([70], 9))
    # a step after the generation's tokens is the last request
    (step,) = _read(jr.tokens(SID, 9, np.array([1], dtype=np.int64), request_id="s"))
    after = replay_of([*_generated("g", (8, 70)), step], 8, "tokens", 1, held)
    assert after.last is not None and after.last[:3] == ("feed", "s", 9)

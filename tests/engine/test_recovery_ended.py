"""Why sessions ended, across restarts, from the journal's `ended` file: an engine started on a
directory whose file is damaged or garbage starts all the same; only the answers it cannot read
are lost (NOT_FOUND), each damaged line counted as a damaged journal record, and the file is
written whole again."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SessionClosed, SessionNotFound
from service.security import principal
from service.security.principal import Principal
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js

from .conftest import EngineFactory, crash, toks


async def _closed(make_engine: EngineFactory, spill: Path, n: int) -> list[str]:
    """`n` sessions made and closed, then a clean stop (which deletes the journal's segments)."""
    first = await make_engine(spill_dir=spill)
    ids = []
    for _ in range(n):
        session, _ = await first.create_session("tok")
        await first.close_session(session.session_id)
        ids.append(session.session_id)
    await first.stop()
    assert not list((spill / "journal").glob("*.log"))  # only the file says they were closed
    return ids


async def test_a_damaged_ended_file_loses_only_the_answers_it_cannot_read(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    ids = await _closed(make_engine, spill, 3)
    path = spill / "journal" / "ended"
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    damaged = bytearray(lines[1])
    damaged[-4] ^= 0x01  # a bit flipped: its checksum fails
    path.write_bytes(lines[0] + bytes(damaged) + lines[2][:20])  # and the last one cut short
    second = await make_engine(spill_dir=spill)
    with pytest.raises(SessionClosed, match="was closed"):
        second.get_session(ids[0])
    for lost in ids[1:]:
        with pytest.raises(SessionNotFound, match="not found"):
            second.get_session(lost)
    assert second.stats().journal_damaged_records == 1  # the cut-short line is no damage
    assert path.read_bytes() == lines[0]  # written anew: what it could read, nothing else
    await second.stop()
    third = await make_engine(spill_dir=spill)
    with pytest.raises(SessionClosed):
        third.get_session(ids[0])
    assert third.stats().journal_damaged_records == 0


async def test_an_engine_starts_on_an_ended_file_of_garbage(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    ids = await _closed(make_engine, spill, 2)
    (spill / "journal" / "ended").write_bytes(bytes(range(256)) * 8)
    second = await make_engine(spill_dir=spill)
    for sid in ids:
        with pytest.raises(SessionNotFound):
            second.get_session(sid)
    assert second.stats().journal_damaged_records > 0
    session, _ = await second.create_session("tok")  # it serves
    await second.close_session(session.session_id)
    await second.stop()
    third = await make_engine(spill_dir=spill)
    with pytest.raises(SessionClosed):
        third.get_session(session.session_id)


async def test_a_closed_session_known_only_by_its_end_record_is_still_its_owners(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """With auth on, a session whose creation record's segment was deleted (a checkpoint
    replaced it) and whose checkpoint went with its close has, after a crash, only its END
    record: that record names its owner, so the owner still hears that it was closed and
    anyone else NOT_FOUND. Before, the END named no owner, and the owner heard NOT_FOUND too."""
    spill = tmp_path / "state"
    alice = principal.current.set(Principal("alice", "client"))
    try:
        first = await make_engine(spill_dir=spill, checkpoint_steps=1, journal_segment_bytes=256)
        session, _ = await first.create_session("tok")
        sid = session.session_id
        for k in range(6):  # checkpointed after each step; the segments roll and go
            await first.feed(sid, toks(k + 1))
        journal = first.durability.journal
        assert journal is not None
        journal.settle()  # type: ignore[attr-defined]
        await first.close_session(sid)
        await crash(first)
        segments = sorted((spill / "journal").glob("*.log"))
        kinds = {r.kind for s in segments for r in js.read_stream(s.read_bytes())}
        assert jr.CREATE not in kinds and jr.END in kinds  # only the END says anything
        second = await make_engine(spill_dir=spill)
        with pytest.raises(SessionClosed, match="was closed"):
            second.get_session(sid)
    finally:
        principal.current.reset(alice)
    bob = principal.current.set(Principal("bob", "client"))
    try:
        with pytest.raises(SessionNotFound):
            second.get_session(sid)
    finally:
        principal.current.reset(bob)

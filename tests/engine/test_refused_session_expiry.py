"""A session refused since start-up expires like any other once its TTL has passed since its
last use: its checkpoint and the journal records held for it are deleted and its END is
journaled, so a late request hears "expired" and a later start does not bring it back. Before
its TTL nothing changes: it stays refused, and comes back once its version does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.errors import SessionClosed, SessionExpired, SessionNotFound, VersionGone
from service.security import principal
from service.security.principal import Principal
from service.sessions import journal_record as jr
from service.sessions.journal import Journal

from .conftest import EngineFactory, FakeClock, crash, toks

# Checkpoints only by eviction (one slot); a TTL short enough to pass by hand.
OPTS = {"slots": 1, "checkpoint_idle_seconds": 3600.0, "ttl_seconds": 60.0}


def _records_of(spill: Path, session_id: str) -> list[int]:
    """The kinds of the journal records on disk for `session_id`."""
    return [r.kind for r in Journal(spill / "journal").open() if r.session_id == session_id]


async def test_a_session_refused_for_its_missing_version_expires_after_its_ttl(
    make_engine: EngineFactory, store_root: Path, tmp_path: Path
) -> None:
    """Two sessions held (tok/1 missing at a restart): one with a checkpoint and steps after it
    (idle since its checkpoint's last use), one with only its journal records (idle from the
    start that refused it). Past their TTL both are ended and what they kept is deleted."""
    spill = tmp_path / "state"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock, **{**OPTS, "slots": 2})
    spilled, _ = await first.create_session("tok")
    await first.feed(spilled.session_id, toks(1, 2))
    filler, _ = await first.create_session("tok", ttl_seconds=600.0)
    journaled, _ = await first.create_session("tok")  # evicts `spilled`: checkpointed at 2
    clock.advance(20.0)
    await first.feed(spilled.session_id, toks(3))  # evicts `filler`; this step journaled only
    await first.feed(journaled.session_id, toks(4))
    await crash(first)
    checkpoint = spill / f"{spilled.session_id}.spill"
    assert checkpoint.exists() and not (spill / f"{journaled.session_id}.spill").exists()
    (store_root / "tok" / "1").rename(tmp_path / "tok-1-away")

    second = await make_engine(spill_dir=spill, clock=clock, **{**OPTS, "slots": 2})
    for held in (spilled, journaled):
        with pytest.raises(VersionGone):
            second.get_session(held.session_id)
    assert await second.sweep_expired() == 0
    clock.advance(30.0)  # 50 s since the checkpoint's last use, 30 s since the start
    assert await second.sweep_expired() == 0
    with pytest.raises(VersionGone):
        await second.feed(spilled.session_id, toks(6))
    assert checkpoint.exists()

    used, size = second.spill.bytes_used, checkpoint.stat().st_size
    clock.advance(15.0)  # 65 s since the checkpoint's last use
    assert await second.sweep_expired() == 1
    assert not checkpoint.exists() and second.spill.bytes_used == used - size
    with pytest.raises(SessionExpired):
        await second.feed(spilled.session_id, toks(6))
    with pytest.raises(VersionGone):
        second.get_session(journaled.session_id)

    clock.advance(20.0)  # 65 s since the start that refused it
    assert await second.sweep_expired() == 1
    with pytest.raises(SessionExpired):
        await second.close_session(journaled.session_id)
    assert second.sessions.broken == {}
    second.durability.journal.settle()  # type: ignore[union-attr]
    await crash(second)
    for held in (spilled, journaled):  # their held records went; only their END is left
        assert jr.CREATE not in _records_of(spill, held.session_id)
        assert jr.END in _records_of(spill, held.session_id)
    (tmp_path / "tok-1-away").rename(store_root / "tok" / "1")

    third = await make_engine(spill_dir=spill, clock=clock, **{**OPTS, "slots": 2})
    for held in (spilled, journaled):  # its version is back, but the session ended
        with pytest.raises(SessionExpired):
            third.get_session(held.session_id)
    assert third.get_session(filler.session_id).position == 0  # not refused: it had no steps


async def test_a_record_whose_header_cannot_be_read_expires_by_its_file_time(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Its owner unknown, nobody can close it while auth is on; it expires the default TTL
    after its file was last written, and its file is deleted."""
    spill = tmp_path / "state"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    bad, _ = await first.create_session("tok")
    await first.feed(bad.session_id, toks(1, 2))
    await first.stop()
    record = spill / f"{bad.session_id}.spill"
    record.write_bytes(b"\x00not a spill record at all" * 20)  # no header, no owner
    written = clock.wall() - 50.0  # written 50 s ago, as the clocks go
    os.utime(record, (written, written))

    second = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    token = principal.current.set(Principal("alice", "client"))
    try:
        with pytest.raises(SessionNotFound):  # nobody can prove it is theirs
            await second.close_session(bad.session_id)
    finally:
        principal.current.reset(token)
    clock.advance(5.0)
    assert await second.sweep_expired() == 0
    assert record.exists()
    clock.advance(6.0)  # 61 s since its file was written
    assert await second.sweep_expired() == 1
    assert not record.exists() and second.spill.bytes_used == 0
    with pytest.raises(SessionExpired):  # auth off: anyone hears why it is gone
        second.get_session(bad.session_id)
    await crash(second)

    third = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    with pytest.raises(SessionExpired):  # its END record says so
        third.get_session(bad.session_id)


async def test_a_refused_record_of_a_session_whose_end_is_journaled_is_deleted_at_start(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Its END says it ended (closed here, then a damaged copy of its record found): it is
    no longer refused, so nothing else would free its record; the start that reads the END
    deletes it."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, **OPTS)
    ended, _ = await first.create_session("tok")
    await first.feed(ended.session_id, toks(1, 2))
    await first.close_session(ended.session_id)
    await crash(first)
    record = spill / f"{ended.session_id}.spill"
    record.write_bytes(b"\x00not a spill record at all" * 20)

    second = await make_engine(spill_dir=spill, **OPTS)
    assert not record.exists() and second.spill.bytes_used == 0
    assert second.sessions.broken == {}
    with pytest.raises(SessionClosed):
        second.get_session(ended.session_id)

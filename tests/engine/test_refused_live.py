"""A session whose checkpoint cannot be read at a restart, but whose journal still holds its
CREATE and every step since, is rebuilt live from the journal: it is refused no more. Neither
the sweeper that expires refused sessions nor anything else takes it for one: no END is
journaled for it and its checkpoint (a good new one, once it is written) is never deleted."""

from __future__ import annotations

from pathlib import Path

from service.sessions import journal_record as jr
from service.sessions.journal import Journal

from .conftest import EngineFactory, FakeClock, crash, toks

# Checkpoints only by eviction (one slot); a TTL short enough to pass by hand.
OPTS = {"slots": 1, "checkpoint_idle_seconds": 3600.0, "ttl_seconds": 60.0}
DAMAGED = b"\x00not a spill record at all" * 20  # no header, no owner


def _records_of(spill: Path, session_id: str) -> list[int]:
    """The kinds of the journal records on disk for `session_id`."""
    return [r.kind for r in Journal(spill / "journal").open() if r.session_id == session_id]


async def test_a_session_rebuilt_from_its_journal_is_not_expired_as_refused(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Used within its own TTL (an hour) but past the default TTL since its damaged record
    was written: the sweeper leaves it alone, and a later start still has it."""
    spill = tmp_path / "state"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    s, _ = await first.create_session("tok", ttl_seconds=3600.0)
    await first.feed(s.session_id, toks(1, 2))
    await first.create_session("tok", ttl_seconds=3600.0)  # evicts s: its checkpoint written
    record = spill / f"{s.session_id}.spill"
    assert record.exists()
    await crash(first)
    record.write_bytes(DAMAGED)

    second = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    assert s.session_id not in second.sessions.broken
    assert await second.sweep_expired() == 0
    assert (await second.feed(s.session_id, toks(3))).position == 3
    clock.advance(100.0)  # past the default TTL since the damaged record's write
    await second.feed(s.session_id, toks(4))
    assert await second.sweep_expired() == 0
    assert second.get_session(s.session_id).position == 4
    second.durability.journal.settle()  # type: ignore[union-attr]
    assert jr.END not in _records_of(spill, s.session_id)
    await crash(second)

    third = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    assert third.get_session(s.session_id).position == 4


async def test_the_new_checkpoint_of_a_rebuilt_session_is_not_deleted_as_refused(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Rebuilt, then evicted: its good new checkpoint replaces the damaged one and stays
    past the default TTL from then; its next use restores it."""
    spill = tmp_path / "state"
    clock = FakeClock()
    first = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    s, _ = await first.create_session("tok", ttl_seconds=3600.0)
    await first.feed(s.session_id, toks(1, 2))
    other, _ = await first.create_session("tok", ttl_seconds=3600.0)  # evicts s
    record = spill / f"{s.session_id}.spill"
    await crash(first)
    record.write_bytes(DAMAGED)

    second = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    assert await second.sweep_expired() == 0
    await second.feed(s.session_id, toks(3))
    await second.feed(other.session_id, toks(9))  # one slot: s evicted, a good checkpoint
    assert record.exists() and record.read_bytes() != DAMAGED
    clock.advance(61.0)
    await second.feed(other.session_id, toks(9))
    assert await second.sweep_expired() == 0
    assert record.exists()
    assert (await second.feed(s.session_id, toks(4))).position == 4

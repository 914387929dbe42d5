"""A checkpoint whose state is damaged (its header intact, so start-up takes it for good) is
rebuilt from the journal after a crash when the journal still holds the session's CREATE and
every step since: from a new session's state through the whole history, the same state an
uninterrupted run has. Its new checkpoint replaces the damaged one. Without that history (a
fork's child, `test_replay.py`) it is refused with DATA_LOSS, as before. An intact checkpoint is
read once and left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.session_engine import SessionEngine
from service.sessions import spill_record
from service.sessions.spill_record import DIGEST_BYTES

from .conftest import EngineFactory, close, crash, toks

# Checkpoints only where a test asks for one: not every N steps, not when idle.
OPTS = {"checkpoint_steps": 1000, "checkpoint_idle_seconds": 3600.0}


def _damage_state(record: Path) -> bytes:
    """Flip a byte of the state arrays (before the digest, after the header); the bytes now."""
    data = bytearray(record.read_bytes())
    data[-DIGEST_BYTES - 5] ^= 0xFF
    record.write_bytes(bytes(data))
    return bytes(data)


async def _checkpointed(
    make_engine: EngineFactory, spill: Path, *, after: int
) -> tuple[str, str, SessionEngine]:
    """A session fed and checkpointed, then fed `after` more steps, and the engine killed; its
    twin on an engine never interrupted; (its id, the twin's, that engine)."""
    first = await make_engine(spill_dir=spill, **OPTS)
    roomy = await make_engine(durability="shutdown")
    s, _ = await first.create_session("tok", seed=5, prefix=toks(1, 2))
    twin, _ = await roomy.create_session("tok", seed=5, prefix=toks(1, 2))
    for k in range(3):
        await first.feed(s.session_id, toks(10 + k, 20 + k))
        await roomy.feed(twin.session_id, toks(10 + k, 20 + k))
    first.residency.writer.checkpoint(first.sessions.get(s.session_id))
    for k in range(after):
        await first.feed(s.session_id, toks(40 + k))
        await roomy.feed(twin.session_id, toks(40 + k))
    await crash(first)
    return s.session_id, twin.session_id, roomy


@pytest.mark.parametrize("after", [0, 2], ids=["nothing-since", "steps-since"])
async def test_a_damaged_checkpoint_with_its_history_journaled_is_rebuilt(
    make_engine: EngineFactory, tmp_path: Path, after: int
) -> None:
    spill = tmp_path / "state"
    sid, twin, roomy = await _checkpointed(make_engine, spill, after=after)
    record = spill / f"{sid}.spill"
    damaged = _damage_state(record)

    second = await make_engine(spill_dir=spill, **OPTS)
    assert sid not in second.sessions.broken
    got, want = await second.feed(sid, toks(99)), await roomy.feed(twin, toks(99))
    assert got.position == want.position == 9 + after  # a prefix of 2, 3 feeds of 2, then 99
    assert close(got.prediction, want.prediction)
    assert second.leases.replays.rebuilt_sessions == 1
    assert second.stats().damaged_checkpoints == 1
    fresh = record.read_bytes()  # the rebuilt checkpoint replaced the damaged one
    assert fresh != damaged and spill_record.decode(fresh, "test").header.session_id == sid


async def test_the_background_check_rebuilds_a_session_nobody_uses(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Found and rebuilt before its first use, so the journal segments can go: the record is
    good by the time the background replay ends, and a later crash needs no history."""
    spill = tmp_path / "state"
    sid, twin, roomy = await _checkpointed(make_engine, spill, after=0)
    record = spill / f"{sid}.spill"
    _damage_state(record)

    second = await make_engine(spill_dir=spill, **OPTS)
    assert second.stats().sessions_replaying == 0  # only a checkpoint to read: not replaying
    await second.leases.replays.wait()
    assert len(second.leases.replays) == 0 and second.leases.replays.rebuilt_sessions == 1
    spill_record.decode(record.read_bytes(), "test")  # whole again
    await crash(second)

    third = await make_engine(spill_dir=spill, **OPTS)
    got, want = await third.feed(sid, toks(7)), await roomy.feed(twin, toks(7))
    assert close(got.prediction, want.prediction)


async def test_an_intact_checkpoint_is_read_once_and_left_as_it_was(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """The check writes nothing, restarts nobody's idle clock and releases the journal."""
    spill = tmp_path / "state"
    sid, twin, roomy = await _checkpointed(make_engine, spill, after=0)
    record = spill / f"{sid}.spill"
    before = record.read_bytes()
    written = record.stat().st_mtime_ns

    second = await make_engine(spill_dir=spill, **OPTS)
    last_used = second.sessions.get(sid).last_used
    await second.leases.replays.wait()
    assert len(second.leases.replays) == 0 and second.leases.replays.rebuilt_sessions == 0
    assert record.read_bytes() == before and record.stat().st_mtime_ns == written
    assert second.sessions.get(sid).last_used == last_used
    assert second.sessions.get(sid).journal_segment is None  # not pinning the journal
    assert second.stats().damaged_checkpoints == 0
    got, want = await second.feed(sid, toks(7)), await roomy.feed(twin, toks(7))
    assert close(got.prediction, want.prediction)

"""Expiry across a crash is decided from the journal, not from the checkpoint alone: a session
with steps journaled after its checkpoint was used until the crash (its idle clock restarts at
recovery), and one without them is judged by its checkpoint's last use and, when expired, stays
expired: its CREATE record still in the journal does not bring it back."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SessionExpired
from service.sessions import journal_record as jr
from service.sessions.journal import Journal

from .conftest import EngineFactory, FakeClock, close, crash, toks

QUIET = {"checkpoint_steps": 1000, "checkpoint_idle_seconds": 3600.0}  # no checkpoint of its own


async def test_steps_journaled_after_an_old_checkpoint_keep_the_session_alive(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    clock = FakeClock()
    small = {**QUIET, "journal_segment_bytes": 300}  # the segment of its CREATE record goes
    first = await make_engine(slots=1, spill_dir=spill, clock=clock, **small)
    roomy = await make_engine(durability="shutdown")
    session, _ = await first.create_session("tok", seed=3, ttl_seconds=60.0)
    ref, _ = await roomy.create_session("tok", seed=3)
    sid = session.session_id
    for k in range(4):
        await first.feed(sid, toks(k + 1))
        await roomy.feed(ref.session_id, toks(k + 1))
    await first.create_session("tok", ttl_seconds=600.0)  # evicts it: checkpointed "now"
    clock.advance(50.0)
    await first.feed(sid, toks(9))  # restored, and this step only journaled
    await roomy.feed(ref.session_id, toks(9))
    first.durability.journal.settle()  # type: ignore[union-attr]
    clock.advance(20.0)  # 20 s after its last use, 70 s after its checkpoint's
    await crash(first)
    records = list(Journal(spill / "journal").open())
    assert not any(r.kind == jr.CREATE and r.session_id == sid for r in records)
    assert (spill / f"{sid}.spill").exists()

    second = await make_engine(slots=1, spill_dir=spill, clock=clock, **small)
    assert second.get_session(sid).position == 5
    clock.advance(50.0)  # used at the crash: its idle clock restarted at recovery
    assert await second.sweep_expired() == 0
    got, want = await second.feed(sid, toks(42)), await roomy.feed(ref.session_id, toks(42))
    assert got.position == want.position == 6 and close(got.prediction, want.prediction)


@pytest.mark.parametrize("twice", [False, True], ids=["one-crash", "crash-after-recovery"])
async def test_an_expired_session_is_not_brought_back_by_its_create_record(
    make_engine: EngineFactory, tmp_path: Path, twice: bool
) -> None:
    spill = tmp_path / "state"
    clock = FakeClock()
    first = await make_engine(slots=1, spill_dir=spill, clock=clock, **QUIET)
    expired, _ = await first.create_session("tok", ttl_seconds=60.0)
    for k in range(2):
        await first.feed(expired.session_id, toks(k + 1))
    kept, _ = await first.create_session("tok", ttl_seconds=600.0)  # evicts it: checkpointed
    clock.advance(70.0)
    await crash(first)
    kinds = [r.kind for r in Journal(spill / "journal").open()]
    assert jr.CREATE in kinds and (spill / f"{expired.session_id}.spill").exists()

    second = await make_engine(slots=1, spill_dir=spill, clock=clock, **QUIET)
    if twice:  # the sweeper ends it (journaling END), then another crash
        assert await second.sweep_expired() == 1
        await crash(second)
        second = await make_engine(slots=1, spill_dir=spill, clock=clock, **QUIET)
    with pytest.raises(SessionExpired):
        await second.feed(expired.session_id, toks(3))
    assert second.get_session(kept.session_id).position == 0
    assert await second.sweep_expired() == (0 if twice else 1)
    assert not (spill / f"{expired.session_id}.spill").exists()
    with pytest.raises(SessionExpired):
        second.get_session(expired.session_id)

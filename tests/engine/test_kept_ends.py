"""Why sessions ended, without a journal (`durability = "shutdown"`): a clean stop writes the
answers to `journal/ended` and the next start reads them (`KeptEnds`). The real-server test,
with SIGTERMs and a SIGKILL, is in `tests/api/test_ended_restarts.py`."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import pytest

from service.engine.kept_ends import KeptEnds
from service.errors import SessionClosed, SessionNotFound, SpillDirUnusable
from service.security import principal
from service.security.principal import Principal
from service.sessions import ended_file
from service.sessions.ended_file import EndedFile, line
from service.sessions.session_store import SessionStore
from tests.tmpfs import fill, mounted_tmpfs

from .conftest import EngineFactory, toks


async def test_a_clean_stop_keeps_why_sessions_ended_for_the_next_start(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    alice = principal.current.set(Principal("alice", "client"))
    try:
        first = await make_engine(spill_dir=spill, durability="shutdown")
        assert first.durability.journal is None
        closed, _ = await first.create_session("tok")
        await first.feed(closed.session_id, toks(1, 2))
        await first.close_session(closed.session_id)
        live, _ = await first.create_session("tok")
        await first.stop()
        second = await make_engine(spill_dir=spill, durability="shutdown")
        with pytest.raises(SessionClosed, match="was closed"):
            second.get_session(closed.session_id)
        assert second.get_session(live.session_id).position == 0  # resumed, not ended
    finally:
        principal.current.reset(alice)
    bob = principal.current.set(Principal("bob", "client"))
    try:
        with pytest.raises(SessionNotFound, match="not found"):
            second.get_session(closed.session_id)
    finally:
        principal.current.reset(bob)
    assert not list((spill / "journal").glob("*.log"))  # nothing journaled: the file alone


async def test_a_file_the_start_could_not_read_is_appended_to_at_the_stop(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error that passes: the stop must not replace what the file holds with this
    process's ends alone."""
    spill = tmp_path / "state"
    (spill / "journal").mkdir(parents=True)
    earlier = ("s_r.aaaa", "expired", "")
    (spill / "journal" / "ended").write_bytes(line(earlier))
    real = ended_file.read_file

    def failing(path: str) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ended_file, "read_file", failing)
    engine = await make_engine(spill_dir=spill, durability="shutdown")
    monkeypatch.setattr(ended_file, "read_file", real)
    with pytest.raises(SessionNotFound, match="not found"):
        engine.get_session(earlier[0])  # unread: NOT_FOUND until a start reads it
    session, _ = await engine.create_session("tok")
    await engine.close_session(session.session_id)
    await engine.stop()
    kept = EndedFile(spill / "journal", durable=True).read()
    assert kept == [earlier, (session.session_id, "closed", "")]


async def test_damaged_lines_count_as_damaged_journal_records(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    (spill / "journal").mkdir(parents=True)
    good = ("s_r.bbbb", "closed", "")
    (spill / "journal" / "ended").write_bytes(b'00000000 s_r.aaaa closed ""\n' + line(good))
    engine = await make_engine(spill_dir=spill, durability="shutdown")
    assert engine.stats().journal_damaged_records == 1
    with pytest.raises(SessionClosed):
        engine.get_session(good[0])


async def test_a_stop_whose_start_never_read_the_file_leaves_it_as_it_is(tmp_path: Path) -> None:
    """A start that failed before the file was read (its stop still runs) must not replace
    what the file holds with the nothing this process remembers."""
    earlier = ("s_r.aaaa", "closed", "alice")
    (tmp_path / "ended").write_bytes(line(earlier))
    sessions = SessionStore(10)
    assert not await KeptEnds(tmp_path, sessions, durable=True).keep()
    assert EndedFile(tmp_path, durable=True).read() == [earlier]
    kept = KeptEnds(tmp_path, sessions, durable=True)
    assert await kept.recall() == 1
    sessions.gone.ended("s_r.bbbb", "expired", "bob")
    assert await kept.keep()
    assert EndedFile(tmp_path, durable=True).read() == [earlier, ("s_r.bbbb", "expired", "bob")]


async def test_a_full_disk_at_the_stop_leaves_the_last_stops_answers(
    make_engine: EngineFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real 2 MB tmpfs, full when the second stop writes the file: the stop goes on (logged),
    the file is the first stop's, whole; the end since is lost (NOT_FOUND), as a crash loses it."""
    with mounted_tmpfs(tmp_path / "disk", "size=2m") as disk:
        spill = disk / "state"
        first = await make_engine(spill_dir=spill, durability="shutdown")
        kept, _ = await first.create_session("tok")
        await first.close_session(kept.session_id)
        await first.stop()
        second = await make_engine(spill_dir=spill, durability="shutdown")
        lost, _ = await second.create_session("tok")
        await second.close_session(lost.session_id)
        filler = fill(disk)
        with caplog.at_level(logging.ERROR, logger="service.sessions.ended_file"):
            await second.stop()
        assert "could not write" in caplog.text
        filler.unlink()
        assert EndedFile(spill / "journal", durable=True).read() == [
            (kept.session_id, "closed", "")
        ]
        third = await make_engine(spill_dir=spill, durability="shutdown")
        with pytest.raises(SessionClosed):
            third.get_session(kept.session_id)
        with pytest.raises(SessionNotFound, match="not found"):
            third.get_session(lost.session_id)
        await third.stop()


async def test_a_journal_a_crash_left_refuses_a_start_without_one(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """A server with the journal crashed (its directory copied while it runs: what a SIGKILL
    leaves). A start without the journal on it served the session from what the journal does
    not hold (here: nothing, NOT_FOUND), and left the journal to a later start with it, which
    replayed it: a session closed meanwhile came back. It refuses to start, naming the setting,
    and leaves the journal; a start with the journal recovers it, and once that one stopped
    cleanly the start without it serves the session."""
    live = tmp_path / "live"
    first = await make_engine(spill_dir=live)  # durability = "journal", the default
    made, _ = await first.create_session("tok")
    await first.feed(made.session_id, toks(1, 2, 3))
    crashed = tmp_path / "crashed"
    shutil.copytree(live, crashed, ignore=shutil.ignore_patterns(".lock"))
    segments = sorted((crashed / "journal").glob("*.log"))
    assert segments
    with pytest.raises(SpillDirUnusable, match="SEQSERVE_SESSIONS__DURABILITY=journal"):
        await make_engine(spill_dir=crashed, durability="shutdown")
    assert sorted((crashed / "journal").glob("*.log")) == segments  # left as they were
    second = await make_engine(spill_dir=crashed)
    assert second.get_session(made.session_id).position == 3
    await second.stop()
    third = await make_engine(spill_dir=crashed, durability="shutdown")
    assert third.get_session(made.session_id).position == 3

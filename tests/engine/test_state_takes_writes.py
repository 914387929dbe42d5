"""Whether steps can be made durable on this replica's disk (`SessionEngine.state_takes_writes`,
which readiness follows): once the journal's disk refused a batch, a probe on a real full tmpfs
says so until the disk has room for that batch again, not merely for a page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.errors import JournalUnavailable
from tests.tmpfs import fill, fill_but, mounted_tmpfs

from .conftest import EngineFactory, RecordingObserver, toks

PAGE = 4096  # tmpfs: the segment's last page takes writes on a full disk


async def test_a_disk_with_room_for_a_page_but_not_the_refused_batch_still_refuses(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """A 4,096-token feed's record (about 16 KiB) is refused by a disk with two pages free.
    The probe wrote one page, which fit: the replica was reported ready again, and the retry
    was refused again (readiness flapped while the disk stayed too full for it). Now the probe
    asks for the refused batch's size: not ready until that fits, then the retry goes through."""
    chunk = toks(*(k % 256 for k in range(4096)))
    with mounted_tmpfs(tmp_path / "disk", "size=2m") as disk:
        engine = await make_engine(spill_dir=disk / "state")
        session, _ = await engine.create_session("tok", seed=1)
        assert await engine.state_takes_writes()
        filler = fill_but(disk, 8192)
        with pytest.raises(JournalUnavailable):
            await engine.feed(session.session_id, chunk)
        for _ in range(2):  # and again: the probe leaves nothing behind that would fill it
            assert not await engine.state_takes_writes()
        os.truncate(filler, filler.stat().st_size - 64 * 1024)
        assert await engine.state_takes_writes()
        assert (await engine.feed(session.session_id, chunk)).position == 4096
        await engine.stop()


async def test_a_create_the_full_disk_refused_is_not_counted_as_made_and_closed(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """A create whose CREATE record a real full disk refused made no session: no `created` and
    no `closed` event (both were counted, for a session no client ever had: `closed` ran past
    `created`). A tmpfs takes writes into the last page of the segment: a step first fills
    that page to within a few bytes of its end."""
    observer = RecordingObserver()
    with mounted_tmpfs(tmp_path / "disk", "size=2m") as disk:
        engine = await make_engine(spill_dir=disk / "state", observer=observer)
        session, _ = await engine.create_session("tok", seed=1)
        segment = max((disk / "state" / "journal").glob("*.log"), key=lambda p: p.stat().st_mtime)
        sizes = [segment.stat().st_size]
        for n in (2, 10):  # a step's record (2+ tokens): a fixed part and a part per token
            await engine.feed(session.session_id, toks(*[1] * n))
            sizes.append(segment.stat().st_size)
        two, ten = sizes[1] - sizes[0], sizes[2] - sizes[1]
        per_token = (ten - two) // 8
        fixed = two - 2 * per_token
        room = -sizes[2] % PAGE + PAGE  # this page's rest and one more, to be safe
        fill_up = (room - fixed - 16) // per_token  # leaves a few bytes
        await engine.feed(session.session_id, toks(*[1] * fill_up))
        assert -segment.stat().st_size % PAGE <= 64  # a CREATE record is some 300 bytes
        filler = fill(disk)
        with pytest.raises(JournalUnavailable):
            await engine.create_session("tok", seed=2)
        assert (observer.count("created"), observer.count("closed")) == (1, 0)
        assert len(engine.sessions) == 1
        filler.unlink()
        await engine.create_session("tok", seed=3)
        assert (observer.count("created"), observer.count("closed")) == (2, 0)
        await engine.stop()

"""A session refused since start-up (its spill record unreadable) can still be closed: closing
is how its owner lets it go. The record is deleted (it no longer counts against the tier's
bytes), its END journaled, and it stays closed across a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import DataLoss, SessionClosed, SessionNotFound

from .conftest import EngineFactory, crash, toks


async def test_closing_a_session_whose_record_is_unreadable_deletes_its_record(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill)
    bad, _ = await first.create_session("tok")
    good, _ = await first.create_session("tok")
    await first.feed(bad.session_id, toks(1, 2))
    await first.stop()
    record = spill / f"{bad.session_id}.spill"
    record.write_bytes(b"\x00not a spill record at all" * 20)  # its header cannot be read

    second = await make_engine(spill_dir=spill)
    with pytest.raises(DataLoss):
        await second.feed(bad.session_id, toks(3))
    used = second.spill.bytes_used
    closed = await second.close_session(bad.session_id)
    assert closed.session_id == bad.session_id
    assert not record.exists() and second.spill.bytes_used == used - 520
    with pytest.raises(SessionClosed):
        await second.feed(bad.session_id, toks(3))
    with pytest.raises(SessionClosed):  # closing again: it is closed, as any other
        await second.close_session(bad.session_id)
    with pytest.raises(SessionNotFound):
        await second.close_session("s_neverexistedneverexisted")
    await crash(second)

    third = await make_engine(spill_dir=spill)
    with pytest.raises(SessionClosed):  # its END record says so
        third.get_session(bad.session_id)
    assert (await third.feed(good.session_id, toks(1))).position == 1

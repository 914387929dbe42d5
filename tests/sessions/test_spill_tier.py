"""The spill directory: atomic records, a size cap, an index built from headers at open."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.errors import (
    Internal,
    SpillCorrupted,
    SpillDirUnusable,
    SpillTierFull,
    SpillTierInUse,
)
from service.runtime.state_pool import SlotSnapshot
from service.sessions import spare_files, spill_tier
from service.sessions.session import new_session_id
from service.sessions.spill_record import SpillRecord
from service.sessions.spill_tier import SpillTier
from tests.tmpfs import fill, mounted_tmpfs

from .test_spill_record import make_record


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[SpillTier]:
    """A tier that promises nothing past a killed process (`ordered=False`), where records
    trade names with spares. `ordered_tier` below is the default server's."""
    t = SpillTier(tmp_path / "spill", max_bytes=1 << 20, ordered=False)
    t.open()
    yield t
    t.close()


def test_write_read_delete(tier: SpillTier) -> None:
    record = make_record()
    tier.write(record)
    sid = record.header.session_id
    assert sid in tier and tier.bytes_used == tier.path(sid).stat().st_size
    assert tier.read(sid).header == record.header
    tier.write(make_record(position=13))  # replacing counts once
    assert tier.bytes_used == tier.path(sid).stat().st_size
    tier.delete(sid)
    assert sid not in tier and tier.bytes_used == 0 and not tier.path(sid).exists()
    with pytest.raises(SpillCorrupted, match="unreadable"):
        tier.read(sid)


def test_a_record_larger_than_one_read_comes_back_whole(tmp_path: Path) -> None:
    """Records are written and read with bare descriptors, in pieces; a big model's record
    (here 2 × 20,000 floats of h and of c: 320 KB, five reads of 64 KiB) round-trips exactly."""
    record = make_record()
    gen = np.random.default_rng(1)
    header = record.header.model_copy(update={"hidden_size": 20_000})
    state = SlotSnapshot(
        h=gen.standard_normal((2, 20_000)).astype(np.float32),
        c=gen.standard_normal((2, 20_000)).astype(np.float32),
    )
    big = SpillRecord(header, state)
    tier = SpillTier(tmp_path / "spill", max_bytes=1 << 30)
    tier.open()
    try:
        tier.write(big, durable=True)
        back = tier.read(header.session_id)
    finally:
        tier.close()
    assert tier.path(header.session_id).stat().st_size > 4 * (1 << 16)
    assert back.header == header
    np.testing.assert_array_equal(back.state.h, state.h)
    assert back.state.c is not None
    np.testing.assert_array_equal(back.state.c, state.c)
    assert [p.name for p in (tmp_path / "spill").iterdir() if p.name.endswith(".tmp")] == []


def test_short_writes_are_completed_and_a_refusing_disk_leaves_the_old_record(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write loop: a disk that takes 100 bytes a call still gets the whole record; one
    that takes nothing (ENOSPC) gives SpillTierFull, one that fails (EIO) Internal; either way
    no temp file is left and the record already there is untouched."""
    real_write = os.write
    monkeypatch.setattr(spill_tier.os, "write", lambda fd, data: real_write(fd, data[:100]))
    first = make_record(position=12)
    sid = first.header.session_id
    tier.write(first)
    assert tier.read(sid).header == first.header
    assert tier.path(sid).stat().st_size > 700  # eight short writes made it

    monkeypatch.setattr(spill_tier.os, "write", lambda fd, data: 0)
    with pytest.raises(SpillTierFull, match="disk is full"):
        tier.write(make_record(position=13))

    def failing(fd: int, data: bytes) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spill_tier.os, "write", failing)
    with pytest.raises(Internal, match="Input/output error"):
        tier.write(make_record(position=14))
    monkeypatch.setattr(spill_tier.os, "write", real_write)
    assert tier.read(sid).header.position == 12
    assert [p.name for p in tier.directory.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_directory_fsync_that_fails_refuses_the_durable_write_as_a_failed_write_is(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A fork's first record is fsynced, then its directory, so that its name survives a power
    loss. When the directory's fsync fails the write is refused as one the disk refused
    (Internal, or SpillTierFull for a full disk), not an OSError its caller does not expect;
    the record is in place and indexed, so deleting its session deletes it. (The directory's
    fsync is replaced: no real filesystem here fails it while the file's own fsync passes.)"""

    def failing(directory: Path) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(spill_tier, "fsync_dir", failing)
    record = make_record()
    sid = record.header.session_id
    with pytest.raises(SpillTierFull if code == errno.ENOSPC else Internal):
        tier.write(record, first=True)
    assert sid in tier and tier.bytes_used == tier.path(sid).stat().st_size
    tier.delete(sid)
    assert not tier.path(sid).exists() and tier.bytes_used == 0
    tier.write(record)  # not durable: no directory fsync, nothing refused
    assert tier.read(sid).header == record.header


def test_size_cap(tmp_path: Path) -> None:
    record = make_record()
    tier = SpillTier(tmp_path / "spill", max_bytes=100)
    tier.open()
    try:
        with pytest.raises(SpillTierFull):
            tier.write(record)
        assert tier.bytes_used == 0 and not tier.path(record.header.session_id).exists()
    finally:
        tier.close()


def test_open_indexes_headers_and_refuses_broken_files(tmp_path: Path) -> None:
    directory = tmp_path / "spill"
    first = SpillTier(directory, max_bytes=1 << 20)
    first.open()
    first.write(make_record(), durable=True)
    first.sync()
    first.close()
    (directory / "s_broken.spill").write_bytes(b"junk")
    (directory / "s_other.spill").write_bytes(first.path("s_abcDEF-_123").read_bytes())
    (directory / ".s_x.spill.123.tmp").write_bytes(b"half a record")  # a crash mid-write
    (directory / "notes.txt").write_text("not ours")
    (directory / "s_x\n.spill").write_bytes(b"not a session's")  # not an id: `$` before "\n"

    second = SpillTier(directory, max_bytes=1 << 20)
    scan = second.open()
    try:
        assert [h.session_id for h in scan.headers] == ["s_abcDEF-_123"]
        assert set(scan.broken) == {"s_broken", "s_other"}  # s_other holds another session
        assert not (directory / ".s_x.spill.123.tmp").exists()
        assert (directory / "notes.txt").exists() and (directory / "s_x\n.spill").exists()
        ours = [p for p in directory.glob("*.spill") if "\n" not in p.name]
        assert second.bytes_used == sum(p.stat().st_size for p in ours)
    finally:
        second.close()


def test_one_owner_per_directory(tier: SpillTier) -> None:
    with pytest.raises(SpillTierInUse):
        SpillTier(tier.directory, max_bytes=1).open()


def test_clean_stop_marker_is_read_once(tmp_path: Path) -> None:
    directory = tmp_path / "spill"
    tier = SpillTier(directory, max_bytes=1 << 20)
    assert tier.open().stopped_at is None
    tier.mark_clean_stop(1234.5)
    tier.close()
    again = SpillTier(directory, max_bytes=1 << 20)
    assert again.open().stopped_at == 1234.5
    again.close()
    third = SpillTier(directory, max_bytes=1 << 20)
    assert third.open().stopped_at is None  # a crash after a start must not reuse it
    third.close()


def test_without_the_journal_a_journal_holding_records_is_refused(tmp_path: Path) -> None:
    """`journaled=False` (`durability = "shutdown"`): a journal segment holding records (left by
    a server with the journal) refuses the open before anything is read or taken: the lock is
    let go, the clean-stop marker stays for the start with the journal. An empty segment holds
    nothing: let be. With the journal, the same directory opens."""
    directory = tmp_path / "spill"
    first = SpillTier(directory, max_bytes=1 << 20)
    first.open()
    first.mark_clean_stop(1234.5)
    first.close()
    journal = directory / "journal"
    journal.mkdir()
    (journal / f"{1:012d}.log").write_bytes(b"")
    unjournaled = SpillTier(directory, max_bytes=1 << 20, journaled=False)
    unjournaled.open()
    unjournaled.close()  # and the marker is read: a new one for the next open
    first.open()
    first.mark_clean_stop(1234.5)
    first.close()
    (journal / f"{2:012d}.log").write_bytes(b"records")
    with pytest.raises(SpillDirUnusable, match=r"holds 1 journal segments .*DURABILITY=journal"):
        SpillTier(directory, max_bytes=1 << 20, journaled=False).open()
    journaled = SpillTier(directory, max_bytes=1 << 20)  # not locked by the refused open
    assert journaled.open().stopped_at == 1234.5
    journaled.close()


def _records(tier: SpillTier, n: int) -> None:
    """`n` new records, written without fsync (as checkpoints and evictions write them)."""
    for _ in range(n):
        record = make_record()
        header = record.header.model_copy(update={"session_id": new_session_id()})
        tier.write(dataclasses.replace(record, header=header))


def _recorded(monkeypatch: pytest.MonkeyPatch, available: bool = True) -> tuple[list, list]:
    """(syncfs calls, per-file fsyncs) made by the tier from now on."""
    whole, files = [], []
    real = spill_tier.syncfs

    def fake_syncfs(directory: Path) -> bool:
        whole.append(directory)
        return real(directory) if available else False

    monkeypatch.setattr(spill_tier, "syncfs", fake_syncfs)
    fsync_file = SpillTier._fsync_file

    def counted(self: SpillTier, session_id: str) -> None:
        files.append(session_id)
        fsync_file(self, session_id)

    monkeypatch.setattr(SpillTier, "_fsync_file", counted)
    return whole, files


def test_many_unsynced_records_take_one_syncfs(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spill_tier, "SYNCFS_FROM", 8)
    whole, files = _recorded(monkeypatch)
    _records(tier, 8)
    tier.sync()
    assert whole == [tier.directory] and files == []
    tier.sync()  # nothing left to sync
    assert len(whole) == 1


def test_few_records_or_no_syncfs_are_fsynced_one_by_one(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spill_tier, "SYNCFS_FROM", 8)
    whole, files = _recorded(monkeypatch, available=False)
    _records(tier, 7)
    tier.sync()
    assert whole == [] and len(files) == 7
    _records(tier, 8)  # enough for syncfs, which this C library lacks
    tier.sync()
    assert len(whole) == 1 and len(files) == 7 + 8


def test_syncfs_reports_what_the_kernel_says(tmp_path: Path) -> None:
    assert spill_tier.syncfs(tmp_path) is True  # Linux: glibc has syncfs
    with pytest.raises(OSError):
        spill_tier.syncfs(tmp_path / "missing")


def _with_id(record: SpillRecord, session_id: str) -> SpillRecord:
    return dataclasses.replace(
        record, header=record.header.model_copy(update={"session_id": session_id})
    )


def _spares(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith(spare_files.SPARE_PREFIX)
    )


def test_a_replaced_record_trades_names_with_a_spare(tier: SpillTier) -> None:
    """The second write of a session goes to a spare file, which then trades names with the
    record (RENAME_EXCHANGE): the old record's file is the spare after, and the third write
    reuses it. Two files alternate; no new one is made after the first replacement."""
    sid = make_record().header.session_id
    tier.write(make_record(position=12))
    first = tier.path(sid).stat().st_ino
    old_bytes = tier.path(sid).read_bytes()
    tier.write(make_record(position=13))
    second = tier.path(sid).stat().st_ino
    assert second != first
    [spare] = _spares(tier.directory)
    assert (tier.directory / spare).stat().st_ino == first  # the old record's file
    assert (tier.directory / spare).read_bytes() == old_bytes
    tier.write(make_record(position=14))
    assert tier.path(sid).stat().st_ino == first  # reused, not made anew
    assert (tier.directory / spare).stat().st_ino == second
    assert tier.read(sid).header.position == 14
    assert tier.bytes_used == tier.path(sid).stat().st_size
    tier.close()
    assert _spares(tier.directory) == []  # close removes the spares


def test_a_smaller_record_over_a_bigger_spare_is_cut_to_its_length(tmp_path: Path) -> None:
    """A spare holds whatever record it last named; a smaller one written over it in place
    must not keep the bigger one's tail (the checksum would refuse it)."""
    record = make_record()
    gen = np.random.default_rng(3)
    big = SpillRecord(
        record.header.model_copy(update={"hidden_size": 500}),
        SlotSnapshot(
            h=gen.standard_normal((2, 500)).astype(np.float32),
            c=gen.standard_normal((2, 500)).astype(np.float32),
        ),
    )
    tier = SpillTier(tmp_path / "spill", max_bytes=1 << 30, ordered=False)
    tier.open()
    try:
        tier.write(big)
        tier.write(big)  # the spare now holds a big record
        tier.write(record)  # written over that spare
        back = tier.read(record.header.session_id)
        assert back.header == record.header
        np.testing.assert_array_equal(back.state.h, record.state.h)
        assert tier.path(record.header.session_id).stat().st_size == tier.bytes_used
    finally:
        tier.close()


def test_spares_and_temp_files_a_crash_left_are_removed_at_open(tmp_path: Path) -> None:
    directory = tmp_path / "spill"
    tier = SpillTier(directory, max_bytes=1 << 20)
    tier.open()
    tier.write(make_record())
    tier.close()
    (directory / f"{spare_files.SPARE_PREFIX}3").write_bytes(b"stale record bytes")
    (directory / ".s_x.spill.99.tmp").write_bytes(b"half a write")
    again = SpillTier(directory, max_bytes=1 << 20)
    scan = again.open()
    try:
        assert [h.session_id for h in scan.headers] == [make_record().header.session_id]
        assert scan.broken == {}
        assert _spares(directory) == [] and not list(directory.glob("*.tmp"))
    finally:
        again.close()


class _NoExchange:
    """A C library whose renameat2 refuses RENAME_EXCHANGE, as some filesystems do."""

    def __init__(self) -> None:
        self.calls = 0

    def renameat2(self, *args: object) -> int:
        self.calls += 1
        ctypes.set_errno(errno.EINVAL)
        return -1


def test_where_names_cannot_be_traded_the_spare_is_renamed_over_the_record(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusing = _NoExchange()
    monkeypatch.setattr(spare_files, "libc", lambda: refusing)
    sid = make_record().header.session_id
    for position in (12, 13, 14, 15):
        tier.write(make_record(position=position))
        assert tier.read(sid).header.position == position
        assert tier.bytes_used == tier.path(sid).stat().st_size
    assert refusing.calls == 1  # refused once: not asked again
    assert _spares(tier.directory) == []  # each spare became the record


def test_rewrites_from_two_threads_keep_every_record_whole(tier: SpillTier) -> None:
    """The loop and the shutdown writer's thread may replace records at once: each takes its
    own spare."""
    ids = [[new_session_id() for _ in range(8)] for _ in range(2)]
    base = make_record()
    for sid in ids[0] + ids[1]:
        tier.write(_with_id(base, sid))
    failures: list[BaseException] = []

    def rewrite(mine: list[str]) -> None:
        try:
            for position in range(13, 63):
                for sid in mine:
                    tier.write(_with_id(make_record(position=position), sid))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=rewrite, args=(mine,)) for mine in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    for sid in ids[0] + ids[1]:
        assert tier.read(sid).header.position == 62
    assert 1 <= len(_spares(tier.directory)) <= spare_files.MAX_SPARES
    assert tier.bytes_used == sum(tier.path(s).stat().st_size for s in ids[0] + ids[1])


def test_an_ended_sessions_file_takes_the_next_first_record(tier: SpillTier) -> None:
    """Deleting a record moves its file out of the record's name, kept as a spare; the next
    session's first record is written over it (no new file), and reads back whole."""
    ended, fresh = make_record(), _with_id(make_record(position=20), new_session_id())
    tier.write(ended)
    inode = tier.path(ended.header.session_id).stat().st_ino
    size = tier.bytes_used
    tier.delete(ended.header.session_id)
    assert not tier.path(ended.header.session_id).exists() and tier.bytes_used == 0
    [spare] = _spares(tier.directory)
    assert (tier.directory / spare).stat().st_ino == inode
    assert (tier.directory / spare).stat().st_size == size
    tier.write(fresh)
    assert tier.path(fresh.header.session_id).stat().st_ino == inode
    assert tier.read(fresh.header.session_id).header == fresh.header
    assert _spares(tier.directory) == []
    assert tier.bytes_used == tier.path(fresh.header.session_id).stat().st_size


def test_spares_stop_at_their_cap(tier: SpillTier, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spare_files, "MAX_SPARES", 3)
    ids = [new_session_id() for _ in range(5)]
    for sid in ids:
        tier.write(_with_id(make_record(), sid))
    for sid in ids:
        tier.delete(sid)
    assert len(_spares(tier.directory)) == 3
    assert [p.name for p in tier.directory.iterdir() if p.suffix == ".spill"] == []


def test_spares_stop_at_their_byte_cap(tier: SpillTier, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spares are outside the tier's cap: a file is kept as one only while the spares hold at
    most `MAX_SPARE_BYTES`."""
    ended = _with_id(make_record(), new_session_id())
    tier.write(make_record(position=12))
    tier.write(ended)
    monkeypatch.setattr(spare_files, "MAX_SPARE_BYTES", 0)
    tier.write(make_record(position=13))  # the old record's file would hold bytes: deleted
    tier.delete(ended.header.session_id)  # and so would the ended session's
    assert _spares(tier.directory) == []
    assert tier.read(make_record().header.session_id).header.position == 13
    monkeypatch.setattr(spare_files, "MAX_SPARE_BYTES", tier.bytes_used)
    tier.write(make_record(position=14))  # room for one
    assert len(_spares(tier.directory)) == 1


def test_the_spares_byte_count_follows_what_they_hold(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for exactly one older record, replacement after replacement keeps one spare:
    the two files keep alternating (a count that only grew would soon delete the spare)."""
    sid = make_record().header.session_id
    tier.write(make_record(position=12))
    monkeypatch.setattr(spare_files, "MAX_SPARE_BYTES", tier.bytes_used)
    inodes = set()
    for position in range(13, 20):
        tier.write(make_record(position=position))
        assert len(_spares(tier.directory)) == 1
        inodes.add(tier.path(sid).stat().st_ino)
    assert len(inodes) == 2 and tier.read(sid).header.position == 19


def test_a_record_gone_from_under_the_tier_is_written_again(tier: SpillTier) -> None:
    """The exchange needs the record's file; when it is missing, the spare is renamed in."""
    sid = make_record().header.session_id
    tier.write(make_record(position=12))
    tier.write(make_record(position=13))  # one spare now
    tier.path(sid).unlink()
    tier.write(make_record(position=14))
    assert tier.read(sid).header.position == 14
    assert _spares(tier.directory) == []  # the spare became the record
    assert tier.bytes_used == tier.path(sid).stat().st_size


class _FailingExchange:
    def renameat2(self, *args: object) -> int:
        ctypes.set_errno(errno.EIO)
        return -1


def test_a_failed_exchange_is_internal_and_keeps_the_record(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = make_record().header.session_id
    tier.write(make_record(position=12))
    monkeypatch.setattr(spare_files, "libc", lambda: _FailingExchange())
    with pytest.raises(Internal, match="Input/output error"):
        tier.write(make_record(position=13))
    assert tier.read(sid).header.position == 12
    assert _spares(tier.directory) == []  # the half-used spare is deleted
    assert tier.bytes_used == tier.path(sid).stat().st_size


def test_a_full_disk_gets_the_spares_space_back_before_refusing(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spares are outside the tier's cap: when the disk is full they are deleted and the write
    tried once more."""
    ended, sid = _with_id(make_record(), new_session_id()), make_record().header.session_id
    tier.write(ended)
    tier.write(make_record(position=12))
    tier.write(make_record(position=13))  # a spare holding the older record
    tier.delete(ended.header.session_id)  # and one holding the ended session's
    assert len(_spares(tier.directory)) == 2
    real_write, calls = os.write, []

    def full_once(fd: int, data: bytes) -> int:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(spill_tier.os, "write", full_once)
    tier.write(make_record(position=14))
    assert tier.read(sid).header.position == 14
    assert len(calls) == 2 and len(_spares(tier.directory)) <= 1


def test_a_file_that_cannot_become_a_spare_is_deleted(
    tier: SpillTier, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    record = make_record()
    tier.write(record)

    def refusing(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spill_tier.os, "rename", refusing)
    tier.delete(record.header.session_id)
    assert not tier.path(record.header.session_id).exists() and _spares(tier.directory) == []
    assert "as a spare" in caplog.text


_REWRITER = """
import dataclasses, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from pathlib import Path
from service.sessions.spill_tier import SpillTier
from test_spill_record import make_record
tier = SpillTier(Path(sys.argv[1]), max_bytes=1 << 30, ordered=False)
tier.open()
ids = [f"s_crash{i:02d}" for i in range(16)]
again = [f"s_again{i:02d}" for i in range(8)]  # ended and made again, round after round
position = 12
while True:
    for sid in ids + again:
        if sid in again and sid in tier:
            tier.delete(sid)
        record = make_record(position=position)
        header = record.header.model_copy(update={"session_id": sid})
        tier.write(dataclasses.replace(record, header=header))
    if position == 13:
        print("replacing", flush=True)
    position += 1
"""


def test_a_server_killed_while_replacing_records_leaves_each_whole(tmp_path: Path) -> None:
    """A process replacing records as fast as it can, and ending sessions and making them
    again, is killed (SIGKILL): on reopening, every record reads back whole (the old one or
    the new one; an ended session's record is there whole or not at all), and the spares are
    gone."""
    directory = tmp_path / "spill"
    here = Path(__file__).resolve().parent
    proc = subprocess.Popen(
        [sys.executable, "-c", _REWRITER, str(directory), str(here.parent.parent), str(here)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "replacing\n"
        time.sleep(0.3)  # hundreds of replacements in flight
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    tier = SpillTier(directory, max_bytes=1 << 30)
    scan = tier.open()
    try:
        assert scan.broken == {}
        found = sorted(h.session_id for h in scan.headers)
        replaced = [s for s in found if s.startswith("s_crash")]
        assert replaced == [f"s_crash{i:02d}" for i in range(16)]
        made_again = [s for s in found if s.startswith("s_again")]
        assert len(made_again) >= 7  # one at most was between its end and its new record
        positions = {s: tier.read(s).header.position for s in found}
        assert min(positions[s] for s in replaced) >= 13
        assert max(positions.values()) - min(positions.values()) <= 1
        assert _spares(directory) == []
    finally:
        tier.close()


_ENDER = """
import os, signal, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from pathlib import Path
from service.sessions import spare_files, spill_tier
from service.sessions.spill_tier import SpillTier
from test_spill_record import make_record
tier = SpillTier(Path(sys.argv[1]), max_bytes=1 << 30, ordered=False)
tier.open()
record = make_record()
tier.write(record)
owner = spill_tier.os if sys.argv[4] == "rename" else spare_files.SpareFiles
setattr(owner, sys.argv[4], lambda *args: os.kill(os.getpid(), signal.SIGKILL))
tier.delete(record.header.session_id)
"""


@pytest.mark.parametrize("killed_at", ["rename", "give_back"])
def test_a_server_killed_while_ending_a_session_leaves_its_record_whole_or_gone(
    tmp_path: Path, killed_at: str
) -> None:
    """Ending a session moves its file out of the record's name in one step: a process killed
    (SIGKILL) before the move leaves the record whole, one killed after it leaves no record
    (and the spare is removed at the next open)."""
    directory = tmp_path / "spill"
    here = Path(__file__).resolve().parent
    argv = [sys.executable, "-c", _ENDER, str(directory), str(here.parent.parent), str(here)]
    proc = subprocess.run([*argv, killed_at], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    tier = SpillTier(directory, max_bytes=1 << 20)
    scan = tier.open()
    try:
        assert scan.broken == {}
        sid = make_record().header.session_id
        if killed_at == "rename":  # before the move: the record is there, whole
            assert [h.session_id for h in scan.headers] == [sid]
            assert tier.read(sid).header == make_record().header
        else:
            assert scan.headers == []
        assert _spares(directory) == []
    finally:
        tier.close()


@pytest.fixture
def ordered_tier(tmp_path: Path) -> Iterator[SpillTier]:
    t = SpillTier(tmp_path / "spill", max_bytes=1 << 20)  # the default: ordered
    t.open()
    yield t
    t.close()


def _opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The files the tier opens for writing from now on: (name, flags)."""
    seen: list[tuple[str, int]] = []
    real = os.open

    def noted(path: str, flags: int, *args: int) -> int:
        if flags & os.O_WRONLY:
            seen.append((os.path.basename(path), flags))
        return real(path, flags, *args)

    monkeypatch.setattr(spill_tier.os, "open", noted)
    return seen


def test_ordered_every_record_is_a_new_file_renamed_into_place(
    ordered_tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a power loss is promised, no spare: ext4 orders a new file's data before a rename
    over the record, not an overwrite in place nor a file made for an exchange. A replacement
    and a first record are each a new temp file renamed into place; an ended session's file is
    deleted."""
    tier, sid = ordered_tier, make_record().header.session_id
    ended = _with_id(make_record(), new_session_id())
    tier.write(make_record(position=12))
    tier.write(ended)
    tier.delete(ended.header.session_id)
    opened = _opens(monkeypatch)
    tier.write(make_record(position=13))
    tier.write(_with_id(make_record(), new_session_id()))
    assert [name.endswith(".tmp") for name, _ in opened] == [True, True]
    assert _spares(tier.directory) == [] and tier.read(sid).header.position == 13


def test_a_forks_first_record_is_fsynced(
    ordered_tier: SpillTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork's first record is its whole history, with no journal record behind it."""
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(spill_tier.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    ordered_tier.write(make_record())
    assert synced == []
    ordered_tier.write(_with_id(make_record(), new_session_id()), first=True)
    assert len(synced) == 2  # the file and the directory


def test_on_a_real_full_disk_the_spares_make_room_for_a_record(tmp_path: Path) -> None:
    """A real tmpfs of 256 KiB: spares left by ended sessions hold pages; the disk is filled to
    the last page; a record bigger than any spare fails over one (ENOSPC), and is written once
    the spares are dropped. With no spare left the next one is refused (SpillTierFull), and
    the records already there read back whole."""
    with mounted_tmpfs(tmp_path / "disk", "size=256k") as disk:
        tier = SpillTier(disk / "spill", max_bytes=1 << 30, ordered=False)
        tier.open()
        kept = make_record()
        tier.write(kept)
        ended = [new_session_id() for _ in range(12)]
        for sid in ended:
            tier.write(_with_id(make_record(), sid))
        for sid in ended:
            tier.delete(sid)  # twelve spares of a page each
        assert len(_spares(tier.directory)) == 12
        fill(disk)  # every page left
        gen = np.random.default_rng(5)
        big = SpillRecord(
            kept.header.model_copy(update={"hidden_size": 2_000}),
            SlotSnapshot(
                h=gen.standard_normal((2, 2_000)).astype(np.float32),
                c=gen.standard_normal((2, 2_000)).astype(np.float32),
            ),
        )  # ~32 KB: eight pages
        first = _with_id(big, new_session_id())
        tier.write(first)
        assert _spares(tier.directory) == []
        np.testing.assert_array_equal(tier.read(first.header.session_id).state.h, big.state.h)
        with pytest.raises(SpillTierFull, match="disk is full"):
            tier.write(_with_id(big, new_session_id()))
        assert tier.read(kept.header.session_id).header == kept.header
        tier.close()

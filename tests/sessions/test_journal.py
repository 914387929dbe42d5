"""The journal on disk: records round-trip, a damaged record is never applied (reading resumes
at the next whole record; a torn tail ends the segment), group commit writes once, segments
nobody needs are deleted, and a write the disk refuses raises JournalUnavailable naming the
setting."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.errors import JournalUnavailable
from service.sessions import checkpoints_flush
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions.journal import Journal
from tests.newer_records import newer_frame
from tests.tmpfs import fill_but, mounted_tmpfs

SID = "s_abcdefghijklmnopqrstuv"


def _records() -> list[bytes]:
    return [
        jr.create(SID, {"model": "tok", "version": 1, "seed": 3}),
        jr.tokens(SID, 0, np.array([1, 2, 3])),
        jr.generated(SID, 3, 250, 1),
        jr.frames("s_other", 7, np.array([[0.5, -1.0, 2.0]], dtype=np.float32)),
        jr.end(SID, 4, "closed"),
    ]


def _started(tmp_path: Path, **options: Any) -> Journal:
    """A journal on an empty directory, opened (nothing to read) and writing."""
    journal = Journal(tmp_path / "journal", **options)
    list(journal.open())
    journal.start()
    return journal


def test_every_kind_round_trips() -> None:
    got = list(js.decode_stream(b"".join(_records())))
    assert [r.kind for r in got] == [jr.CREATE, jr.TOKENS, jr.GENERATED, jr.FRAMES, jr.END]
    assert got[0].meta == {"model": "tok", "version": 1, "seed": 3}
    assert got[1].tokens is not None and got[1].tokens.tolist() == [1, 2, 3]
    assert (got[1].position, got[1].consumed) == (0, 3)
    assert got[2].tokens is not None and (got[2].tokens.tolist(), got[2].draws) == ([250], 1)
    assert got[3].frames is not None and got[3].frames.tolist() == [0.5, -1.0, 2.0]
    assert (got[3].session_id, got[3].position) == ("s_other", 7)
    assert (got[4].why, got[4].position) == ("closed", 4)


@pytest.mark.parametrize(
    ("token", "request_id", "top_k", "per_position"),
    [(0, "", 0, False), (255, "r-1", 5, True), (2**31 - 1, "é" * 300, 70000, False)],
)
def test_one_token_is_the_same_bytes_as_a_one_token_array(
    token: int, request_id: str, top_k: int, per_position: bool
) -> None:
    many = jr.tokens(SID, 9, np.array([token]), request_id, top_k, per_position)
    assert jr.one_token(SID, 9, token, request_id, top_k, per_position) == many


@pytest.mark.parametrize(
    ("request_id", "steps"),
    [("", [(0, 0, 0)]), ("gen-1", [(3, 97, 1), (4, 255, 0), (2**40, 2**31 - 1, 1)]),
     ("é" * 64, [(9, 10, 1)])],  # 128 bytes of UTF-8: the longest request id accepted
)  # fmt: skip
def test_a_generations_encoder_writes_the_same_bytes_as_generated(
    request_id: str, steps: list[tuple[int, int, int]]
) -> None:
    encoder = jr.GeneratedRecords(SID, request_id)
    for position, token, draws in steps:
        record = encoder.record(position, token, draws)
        assert record == jr.generated(SID, position, token, draws, request_id)
        (read,) = js.decode_stream(record)
        assert (read.kind, read.session_id, read.position, read.draws) == (
            jr.GENERATED, SID, position, draws,
        )  # fmt: skip
        assert read.tokens is not None and read.tokens.tolist() == [token]


@pytest.mark.parametrize("damage", ["flip", "truncate", "newer-version"])
def test_a_damaged_record_is_skipped_and_reading_resumes_after_it(damage: str) -> None:
    records = _records()
    data = bytearray(b"".join(records))
    at = len(records[0]) + len(records[1])  # the third record (GENERATED)
    if damage == "flip":
        data[at + 12] ^= 0x01  # its body: the checksum no longer matches
    elif damage == "truncate":
        data = data[: at + 5]
    else:  # a record a newer server wrote: not guessed at
        data = data[:at] + newer_frame(records[2]) + data[at + len(records[2]) :]
    got = list(js.decode_stream(bytes(data)))
    if damage == "truncate":  # a torn tail: the end of what was written
        assert [r.kind for r in got] == [jr.CREATE, jr.TOKENS]
    else:  # the record is never applied; the ones after it still are
        assert [r.kind for r in got] == [jr.CREATE, jr.TOKENS, jr.FRAMES, jr.END]


def test_a_torn_last_record_and_a_whole_one_failing_its_checksum_are_told_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The newest segment's last record shorter than its length says is what a crash mid-write
    leaves: dropped, noted at INFO, not counted. A whole last record that fails its checksum is
    what a power loss leaves of an unsynced write, or damage: dropped too (recovery never sees
    it), but logged as a WARNING naming the segment, the offset and the session its head names,
    and counted. (In an older segment either is damage: tests/engine/test_recovery.py.)"""
    records = _records()[:3]  # CREATE, TOKENS, GENERATED (the last)
    last = sum(len(r) for r in records[:2])
    torn = b"".join(records)[:-3]
    damaged = bytearray(b"".join(records))
    damaged[-1] ^= 0x01  # its token's last byte: the length still fits, the checksum fails
    caplog.set_level("INFO", logger="service.sessions.journal")
    journals = {}
    for name, data in (("torn", torn), ("damaged", bytes(damaged))):
        directory = tmp_path / name
        directory.mkdir()
        (directory / f"{1:012d}.log").write_bytes(data)
        journals[name] = journal = Journal(directory)
        got = list(journal.open())
        assert [r.kind for r in got] == [jr.CREATE, jr.TOKENS]  # nothing unreadable passed on

    assert list(js.read_stream(bytes(damaged)))[-1] == js.Unreadable(
        last, js.TAIL, SID, 3, jr.GENERATED
    )
    assert list(js.read_stream(torn))[-1] == js.Unreadable(last, js.TORN, SID, 3, jr.GENERATED)
    assert journals["torn"].damaged_records == 0 and journals["damaged"].damaged_records == 1
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    message = warning.getMessage()
    assert "damaged" in message and f"offset {last}" in message and SID in message
    (info,) = [r for r in caplog.records if r.levelname == "INFO"]
    assert "torn" in info.getMessage() and f"offset {last}" in info.getMessage()


@pytest.mark.parametrize("zeroed", [1, 2])
def test_a_zeroed_tail_is_a_power_loss_s_warned_and_counted_not_a_crash_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, zeroed: int
) -> None:
    """The newest segment's last whole records zeroed, its length kept, is what a power loss
    leaves when the file's length reached the disk before its bytes; a crash (a write cut short)
    never leaves zeros. It is dropped like a whole last record failing its checksum: a WARNING,
    counted in `damaged_records`, the segment cut back to its last good record. Before, it read
    as a record cut short (its length, 0, runs past nothing): an INFO line, not counted."""
    records = _records()[:3]
    kept = sum(len(r) for r in records[:-zeroed])
    data = b"".join(records[:-zeroed]) + bytes(sum(len(r) for r in records[-zeroed:]))
    directory = tmp_path / "journal"
    directory.mkdir()
    segment = directory / f"{1:012d}.log"
    segment.write_bytes(data)
    caplog.set_level("INFO", logger="service.sessions.journal")
    journal = Journal(directory)
    got = list(journal.open())

    assert [r.kind for r in got] == [jr.CREATE, jr.TOKENS][: 3 - zeroed]
    assert list(js.read_stream(data))[-1] == js.Unreadable(kept, js.TAIL)
    assert journal.damaged_records == 1
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"offset {kept}" in warning.getMessage() and "power loss" in warning.getMessage()
    assert not [r for r in caplog.records if r.levelname == "INFO" and "cut short" in r.message]
    assert segment.stat().st_size == kept  # cut off: a later start does not take it for damage


def test_damage_that_whole_records_follow_is_damage_whatever_its_length_says() -> None:
    """A record whose length field is damaged, so that it seems to run past the end, is not a
    torn tail when whole records follow it."""
    records = _records()
    data = bytearray(b"".join(records))
    data[len(records[0]) + 3] = 0x7F  # the TOKENS record's length: far past the end
    got = list(js.read_stream(bytes(data)))
    assert [type(r) for r in got] == [jr.JournalRecord, js.Unreadable] + [jr.JournalRecord] * 3
    assert got[1] == js.Unreadable(len(records[0]), js.DAMAGED, SID, 0, jr.TOKENS)
    assert [r.kind for r in js.decode_stream(bytes(data))] == [
        jr.CREATE, jr.GENERATED, jr.FRAMES, jr.END,
    ]  # fmt: skip


def test_a_newer_servers_record_names_its_session_and_is_passed_on_whole(tmp_path: Path) -> None:
    """A whole record whose version is above this server's, its checksum good, is a newer
    seqserve's: `read_stream` reports it with the session, position and kind its head names and
    its frame as written, reading on right after it; `Journal.open` passes it on to recovery
    (which refuses its session), not counted as damage. Before, it came without its session,
    and `open` dropped it: recovery never knew the session had a step it could not read."""
    records = _records()
    newer = newer_frame(records[2])  # GENERATED at position 3
    data = records[0] + records[1] + newer + records[3] + records[4]
    at = len(records[0]) + len(records[1])
    got = list(js.read_stream(data))
    read = got[2]
    assert isinstance(read, js.Unreadable)
    assert (read.offset, read.what, read.session_id, read.position, read.kind) == (
        at, js.NEWER, SID, 3, jr.GENERATED,
    )  # fmt: skip
    assert getattr(read, "raw", None) == newer
    assert [r.kind for r in got if isinstance(r, jr.JournalRecord)] == [
        jr.CREATE, jr.TOKENS, jr.FRAMES, jr.END,
    ]  # fmt: skip
    directory = tmp_path / "journal"
    directory.mkdir()
    (directory / f"{1:012d}.log").write_bytes(data)
    journal = Journal(directory)
    assert list(journal.open()) == got and journal.damaged_records == 0


def _resync_every_byte(data: bytes, offset: int) -> int:
    """What `_resync` must find: the first offset where `decode_at` reads a whole record."""
    while offset + 8 <= len(data):
        if jr.decode_at(data, offset)[0] is not None:
            return offset
        offset += 1
    return len(data)


def test_after_any_one_flipped_byte_reading_resumes_where_a_byte_by_byte_search_would() -> None:
    records = [*_records(), jr.generation_start(SID, 4, "g", {"temperature": 0.5})]
    records += [jr.one_token(SID, 5 + i, i, request_id=f"r{i}") for i in range(3)]
    clean = b"".join(records)
    for at in range(len(clean)):
        for bit in (0x01, 0x80):
            data = bytearray(clean)
            data[at] ^= bit
            for offset in range(0, len(data), 7):
                assert js._resync(bytes(data), offset) == _resync_every_byte(bytes(data), offset)


def test_a_damaged_large_feed_is_skipped_without_trying_each_of_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flipped byte in a 1 MB feed of token ids (each id a plausible small record length):
    the search tries only offsets where a body could begin, not a million (32 s for 4 MB)."""
    feed = jr.tokens(SID, 0, np.arange(250_000) % 256, request_id="big")
    after = jr.end(SID, 250_000, "closed")
    data = bytearray(feed + after)
    data[100] ^= 0xFF
    tries = 0
    frame_at = jr.decode_at

    def counted(buf: bytes, offset: int) -> tuple[jr.JournalRecord | None, int]:
        nonlocal tries
        tries += 1
        return frame_at(buf, offset)

    monkeypatch.setattr(js, "decode_at", counted)  # as `journal_scan` calls it
    got = list(js.decode_stream(bytes(data)))
    assert [r.kind for r in got] == [jr.END]
    assert tries < 100, tries


def test_a_stretch_of_false_newer_starts_is_searched_past_once() -> None:
    """Bytes that look like the start of a newer server's record (a version above ours, then
    a session id's length and "s_") but are not whole records, 2,000 of them before the next
    readable one: the search for that next readable start is made once, not again after each
    false one (each scanned on to the same start: quadratic in the stretch)."""
    false_newer = bytes([jr.VERSION + 1, 0, 3]) + b"s_"
    assert js._NEWER_START.fullmatch(false_newer) and not js._BODY_START.search(false_newer * 2)
    after = jr.end(SID, 7, "closed")
    data = false_newer * 2_000 + after
    searches = 0
    body_start = js._BODY_START

    class Counted:
        def search(self, buf: bytes, pos: int) -> re.Match[bytes] | None:
            nonlocal searches
            searches += 1
            return body_start.search(buf, pos)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(js, "_BODY_START", Counted())
        found = js._resync(data, 1)
    assert found == len(data) - len(after) == _resync_every_byte(data, 1)
    assert searches <= 2, searches


def test_group_commit_is_one_write_and_reads_back_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", fsync="batch")
    assert list(journal.open()) == []
    journal.start()
    journal.append(_records()[:2])
    journal.append(_records()[2:])
    journal.close()
    again = Journal(tmp_path / "journal")
    assert [r.kind for r in again.open()] == [jr.CREATE, jr.TOKENS, jr.GENERATED, jr.FRAMES, jr.END]


def test_only_segment_names_are_read_as_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", fsync="batch")
    assert list(journal.open()) == []
    journal.start()
    journal.append(_records())
    journal.close()
    (first,) = (tmp_path / "journal").iterdir()
    # A copy under a name that is not a segment's (`$` alone let the trailing "\n" through)
    # must not be read as one: its records would be applied twice.
    (tmp_path / "journal" / f"{first.name}\n").write_bytes(first.read_bytes())
    (tmp_path / "journal" / "notes.log").write_bytes(first.read_bytes())
    again = Journal(tmp_path / "journal")
    assert [r.kind for r in again.open()] == [jr.CREATE, jr.TOKENS, jr.GENERATED, jr.FRAMES, jr.END]
    again.close()


def test_segments_nobody_pins_are_deleted(tmp_path: Path) -> None:
    journal = _started(tmp_path, fsync="never", segment_bytes=64)
    segments = []
    for i in range(4):  # each append fills a segment; the next one rolls
        seq = journal.append([jr.tokens(SID, i * 10, np.arange(20))])
        journal.pin(seq)
        segments.append(seq)
    files = lambda: sorted(p.name for p in (tmp_path / "journal").iterdir())  # noqa: E731
    assert len(files()) == 4
    journal.unpin(segments[1])  # an older segment is still pinned: nothing can go
    journal.settle()
    assert len(files()) == 4
    journal.unpin(segments[0])  # now the two oldest are free
    journal.settle()
    assert files() == [f"{s:012d}.log" for s in segments[2:]]
    journal.close()


def test_full_segments_are_synced_closed_and_deleted_off_the_appending_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends run on the event loop: a roll's fsync and close, and a deletion, do not."""
    journal = _started(tmp_path, fsync="never", segment_bytes=64)
    seen: list[tuple[str, str]] = []
    fsync, close, unlink = os.fsync, os.close, Path.unlink

    def noted(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            seen.append((name, threading.current_thread().name))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "fsync", noted("fsync", fsync))
    monkeypatch.setattr(os, "close", noted("close", close))
    monkeypatch.setattr(Path, "unlink", noted("unlink", unlink))
    first = journal.append([jr.tokens(SID, 0, np.arange(20))])
    journal.pin(first)
    second = journal.append([jr.tokens(SID, 20, np.arange(20))])  # rolls: `first` is full
    journal.pin(second)
    journal.unpin(first)
    journal.settle()
    assert {name for name, _ in seen} == {"fsync", "close", "unlink"}
    assert {thread for _, thread in seen} == {"journal-janitor"}
    assert not (tmp_path / "journal" / f"{first:012d}.log").exists()
    monkeypatch.undo()
    journal.close()
    again = Journal(tmp_path / "journal")
    assert [r.position for r in again.open()] == [20]


def test_a_refused_write_names_the_setting_and_the_next_starts_a_new_segment(
    tmp_path: Path,
) -> None:
    journal = _started(tmp_path, fsync="never")
    first = journal.append([jr.tokens(SID, 0, np.array([1]))])
    fd = journal._fd
    assert fd is not None
    os.close(fd)  # the next write fails with EBADF, like a disk gone bad
    journal._fd = os.open(os.devnull, os.O_RDONLY)  # a descriptor that refuses writes
    with pytest.raises(JournalUnavailable) as err:
        journal.append([jr.tokens(SID, 1, np.array([2]))])
    message = err.value.message
    assert "SEQSERVE_SESSIONS__SPILL_DIR" in message and str(tmp_path) not in message
    assert journal.failed_writes == 1
    second = journal.append([jr.tokens(SID, 1, np.array([3]))])
    assert second == first + 1
    journal.close()
    got = list(Journal(tmp_path / "journal").open())
    assert [r.tokens.tolist() for r in got if r.tokens is not None] == [[1], [3]]


def test_a_records_session_and_kind_read_without_decoding_it() -> None:
    for record, kind in (
        (jr.tokens("s_ab.cd", 3, np.array([1, 2], dtype=np.int32), "r1"), jr.TOKENS),
        (jr.create("s_x", {"model": "m"}), jr.CREATE),
        (jr.end("s_" + "y" * 60, 9, "closed"), jr.END),
    ):
        (decoded,) = js.decode_stream(record)
        assert jr.session_of(record) == decoded.session_id
        assert jr.kind_of(record) == kind == decoded.kind


def test_with_the_fsync_thread_a_full_segment_is_synced_before_anything_newer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interval policy's thread fsyncs a full segment before the one being written, so a
    power loss cannot keep newer records and lose older ones (a gap recovery refuses)."""
    # Its fsync thread waits an hour: the `sync()` below is the one that runs.
    journal = _started(tmp_path, fsync_interval_seconds=3600, segment_bytes=64)
    first = journal.append([jr.tokens(SID, 0, np.arange(20))])
    second = journal.append([jr.tokens(SID, 20, np.arange(20))])  # rolls: `first` is full
    synced: list[str] = []
    fsync = os.fsync

    def noted(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", noted)
    journal.sync()
    assert synced == [f"{first:012d}.log", f"{second:012d}.log"]
    monkeypatch.undo()
    journal.close()


def test_a_roll_that_cannot_open_the_next_segment_still_closes_the_full_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _started(tmp_path, fsync="never", segment_bytes=64)
    journal.append([jr.tokens(SID, 0, np.arange(20))])
    full = journal._fd
    assert full is not None
    real_open = os.open

    def no_space(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".log"):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_space)
    with pytest.raises(JournalUnavailable):
        journal.append([jr.tokens(SID, 20, np.arange(20))])  # the roll fails
    journal.settle()
    with pytest.raises(OSError):
        os.fstat(full)  # closed: no descriptor leaks per failed roll
    monkeypatch.undo()
    assert journal.append([jr.tokens(SID, 20, np.arange(20))]) > 0  # the disk is back
    journal.close()


def test_on_a_disk_out_of_inodes_a_failed_roll_leaks_no_descriptor(tmp_path: Path) -> None:
    """A real tmpfs with a handful of inodes: the next segment cannot be created (ENOSPC), the
    append is refused, the full segment's descriptor is closed all the same, and once an inode
    is free again the journal goes on in a new segment."""
    with mounted_tmpfs(tmp_path / "disk", "size=1m,nr_inodes=8") as disk:
        journal = _started(disk, fsync="never", segment_bytes=64)
        journal.append([jr.tokens(SID, 0, np.arange(20))])  # fills its segment
        fillers = []
        with pytest.raises(OSError):
            while True:  # take every inode left
                (disk / f"filler{len(fillers)}").touch()
                fillers.append(disk / f"filler{len(fillers)}")
        open_fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
        before = open_fds()
        for _ in range(3):
            with pytest.raises(JournalUnavailable):
                journal.append([jr.tokens(SID, 20, np.arange(20))])  # needs a new segment
        journal.settle()
        assert open_fds() == before - 1  # the full segment's, closed; nothing leaked
        fillers.pop().unlink()
        assert journal.append([jr.tokens(SID, 20, np.arange(20))]) > 1
        journal.close()
        got = list(Journal(disk / "journal").open())
        assert [r.position for r in got] == [0, 20]


def _flushes(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[tuple[Path, list[str]]]:
    """The journal's flushes of the checkpoints from now on: (the directory its descriptor is
    open on, the journal's segments on disk at that moment)."""
    seen: list[tuple[Path, list[str]]] = []

    def fake_syncfs_fd(fd: int, what: object = "") -> bool:
        directory = Path(os.readlink(f"/proc/self/fd/{fd}"))
        seen.append((directory, sorted(p.name for p in (directory / "journal").iterdir())))
        if fail:
            raise OSError(5, "Input/output error")
        return True

    monkeypatch.setattr(checkpoints_flush, "syncfs_fd", fake_syncfs_fd)
    return seen


def _two_segments(journal: Journal) -> tuple[int, int]:
    first = journal.append([jr.tokens(SID, 0, np.arange(20))])
    journal.pin(first)
    second = journal.append([jr.tokens(SID, 20, np.arange(20))])  # rolls: `first` is full
    journal.pin(second)
    return first, second


def test_a_segment_is_deleted_only_after_the_checkpoints_are_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoints that released a segment are written without an fsync: the filesystem
    holding them is flushed (syncfs) before the segment goes, so a power loss cannot take both."""
    seen = _flushes(monkeypatch)
    journal = _started(
        tmp_path, fsync_interval_seconds=3600, segment_bytes=64, checkpoints=tmp_path
    )
    first, second = _two_segments(journal)
    journal.unpin(first)
    journal.settle()
    assert seen == [(tmp_path, [f"{first:012d}.log", f"{second:012d}.log"])]  # still there
    assert not (tmp_path / "journal" / f"{first:012d}.log").exists()  # then deleted
    journal.close()


def test_segments_freed_together_take_one_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _flushes(monkeypatch)
    journal = _started(tmp_path, fsync="batch", segment_bytes=64, checkpoints=tmp_path)
    segments = []
    for i in range(5):
        seq = journal.append([jr.tokens(SID, i * 20, np.arange(20))])
        journal.pin(seq)
        segments.append(seq)
    for seq in segments[1:4]:
        journal.unpin(seq)  # nothing can go while the oldest is pinned
    journal.unpin(segments[0])  # now four go at once
    journal.settle()
    assert len(seen) == 1
    assert sorted(p.name for p in (tmp_path / "journal").iterdir()) == [f"{segments[4]:012d}.log"]
    journal.close()


def test_after_a_failed_flush_no_segment_is_deleted_until_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel reports a writeback error once: a flush that succeeds after one that failed
    does not mean the checkpoints before it reached the disk."""
    seen = _flushes(monkeypatch, fail=True)
    journal = _started(tmp_path, fsync="batch", segment_bytes=64, checkpoints=tmp_path)
    first, second = _two_segments(journal)
    journal.unpin(first)
    journal.settle()
    _flushes(monkeypatch)  # flushes succeed from now on
    third = journal.append([jr.tokens(SID, 40, np.arange(20))])
    journal.pin(third)
    journal.unpin(second)
    journal.settle()
    assert len(seen) == 1  # not flushed again: nothing is deleted
    assert (tmp_path / "journal" / f"{first:012d}.log").exists()
    assert (tmp_path / "journal" / f"{second:012d}.log").exists()
    journal.close()


def test_a_segment_stays_when_the_checkpoints_cannot_be_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _flushes(monkeypatch, fail=True)
    journal = _started(tmp_path, fsync="batch", segment_bytes=64, checkpoints=tmp_path)
    first, _ = _two_segments(journal)
    journal.unpin(first)
    journal.settle()
    assert len(seen) == 1
    assert (tmp_path / "journal" / f"{first:012d}.log").exists()
    assert "no journal segment is deleted" in caplog.text
    journal.close()
    assert [r.position for r in Journal(tmp_path / "journal").open()] == [0, 20]


def test_without_fsyncs_or_checkpoints_nothing_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`never` promises nothing past a killed process; a journal told of no checkpoints has
    nothing to flush."""
    seen = _flushes(monkeypatch)
    for name, options in (("never", {"fsync": "never", "checkpoints": tmp_path}), ("none", {})):
        journal = _started(tmp_path / name, segment_bytes=64, **options)
        first, _ = _two_segments(journal)
        journal.unpin(first)
        journal.settle()
        assert not (tmp_path / name / "journal" / f"{first:012d}.log").exists()
        journal.close()
    assert seen == []


def test_segments_dropped_after_recovery_wait_for_the_flush_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _started(tmp_path, fsync="batch", segment_bytes=64)
    _two_segments(journal)
    journal.close()
    seen = _flushes(monkeypatch, fail=True)
    again = Journal(tmp_path / "journal", fsync="batch", segment_bytes=64, checkpoints=tmp_path)
    assert len(list(again.open())) == 2
    again.start()
    again.drop_before(again.segment)  # the flush fails: the old segments stay
    assert len(seen) == 1 and len(list((tmp_path / "journal").iterdir())) == 3
    again.close()
    third = Journal(tmp_path / "journal", fsync="batch", segment_bytes=64, checkpoints=tmp_path)
    assert len(list(third.open())) == 2
    third.start()
    seen.clear()
    _flushes(monkeypatch)
    third.drop_before(third.segment)
    assert len(list((tmp_path / "journal").iterdir())) == 1
    third.close()


def test_a_batch_a_full_disk_cut_short_leaves_none_of_its_records(tmp_path: Path) -> None:
    """A real full tmpfs: the batch's write is short, so some of its whole records reach the
    segment. It is refused, and a journal read after a crash holds none of them (the client was
    told the step was not applied), only the batches before it."""
    with mounted_tmpfs(tmp_path / "disk", "size=1m") as disk:
        journal = _started(disk, fsync="never")
        journal.append([jr.tokens(SID, 0, np.array([1]))])
        filler = fill_but(disk, 6000)  # room for the first records of the next batch only
        batch = [jr.tokens(f"s_{k:02d}", 0, np.arange(400)) for k in range(20)]  # ~32 KB
        with pytest.raises(JournalUnavailable):
            journal.append(batch)
        got = list(Journal(disk / "journal").open())  # what a kill -9 now leaves
        assert [r.session_id for r in got] == [SID]
        filler.unlink()
        journal.append([jr.tokens(SID, 1, np.array([2]))])  # the disk is back
        journal.close()
        got = list(Journal(disk / "journal").open())
        assert [(r.session_id, r.position) for r in got] == [(SID, 0), (SID, 1)]


def test_a_torn_segment_that_cannot_be_cut_is_read_only_up_to_its_batches_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cut fails too (an I/O error): the segment's name carries its length before the
    refused batch, recovery reads no further, and the segment is still deleted once free."""
    journal = _started(tmp_path, fsync="batch")
    first = journal.append([jr.tokens(SID, 0, np.array([1]))])
    journal.pin(first)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)  # the whole batch is written, its fsync fails
    monkeypatch.setattr(os, "ftruncate", lambda fd, size: failing(fd))
    with pytest.raises(JournalUnavailable):
        journal.append([jr.tokens(SID, 1, np.array([2])), jr.tokens("s_other", 0, np.array([3]))])
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "journal").iterdir()] == [f"{first:012d}.{_ONE}.log"]
    got = list(Journal(tmp_path / "journal").open())
    assert [(r.session_id, r.position) for r in got] == [(SID, 0)]
    second = journal.append([jr.tokens(SID, 1, np.array([2]))])
    journal.pin(second)
    journal.unpin(first)
    journal.settle()
    assert sorted(p.name for p in (tmp_path / "journal").iterdir()) == [f"{second:012d}.log"]
    journal.close()


_ONE = len(jr.tokens(SID, 0, np.array([1])))


def _names(journal: Journal) -> list[str]:
    return sorted(p.name for p in journal.directory.iterdir())


def test_a_torn_segment_found_at_a_restart_is_deleted_once_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment renamed `<sequence>.<length>.log` by a failed append, found by the next start,
    is trimmed like any other (deleted by sequence, whatever its name): left behind, its
    records (a CREATE) would outlive the END that a trimmed later segment held."""
    first = _started(tmp_path, fsync="batch")
    torn = first.append([jr.tokens(SID, 0, np.array([1]))])
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    monkeypatch.setattr(os, "ftruncate", lambda fd, size: os.fsync(fd))
    with pytest.raises(JournalUnavailable):
        first.append([jr.tokens(SID, 1, np.array([2]))])
    monkeypatch.undo()
    first.close()  # what a crash leaves: the renamed segment
    assert _names(first) == [f"{torn:012d}.{_ONE}.log"]

    second = Journal(tmp_path / "journal", fsync="batch")
    assert [r.position for r in second.open()] == [0]
    second.start()
    second.pin(second.oldest)  # a session recovered from it, until its checkpoint
    newer = second.append([jr.tokens(SID, 1, np.array([2]))])
    second.pin(newer)
    second.unpin(second.oldest)
    second.settle()
    assert _names(second) == [f"{newer:012d}.log"]
    second.close()


def _two_old_segments(tmp_path: Path) -> None:
    """A crashed journal: a held session's records (SID) among another's, in two segments."""
    journal = _started(tmp_path, segment_bytes=1)  # one batch a segment
    journal.append([jr.create(SID, {"model": "tok"}), jr.create("s_other", {"model": "tok"})])
    journal.append([jr.tokens(SID, 0, np.array([1])), jr.end("s_other", 0, "closed")])
    journal.close()


def test_held_records_stay_without_holding_back_the_trimming_of_any_segment(
    tmp_path: Path,
) -> None:
    """Recovery copies the records of the sessions it holds into a segment of their own: the
    segments it read and every later one are trimmed as usual, the held one is not, and the
    next start reads it first; closing the held session deletes it."""
    _two_old_segments(tmp_path)
    journal = Journal(tmp_path / "journal", segment_bytes=1)  # one batch a segment
    read = list(journal.open())
    assert journal.hold({SID: [jr.create(SID, {"model": "tok"}), jr.tokens(SID, 0, np.array([1]))]})
    journal.start()
    held = journal.segment - 1
    assert held == 3 and len(read) == 4
    journal.drop_before(journal.segment)  # recovery: nothing to replay
    assert _names(journal) == [f"{held:012d}.log", f"{held + 1:012d}.log"]
    for k in range(5):  # later segments come and go
        segment = journal.append([jr.tokens("s_new", k, np.array([k]))])
        journal.pin(segment)
        journal.unpin(segment)  # checkpointed
    journal.settle()
    assert _names(journal) == [f"{held:012d}.log", f"{journal.segment:012d}.log"]
    again = Journal(tmp_path / "journal")  # a crash now: the next start finds its records
    got = [(r.kind, r.session_id) for r in again.open()]
    assert got == [(jr.CREATE, SID), (jr.TOKENS, SID), (jr.TOKENS, "s_new")]
    journal.release(SID)  # its owner closed it (its END journaled first)
    journal.settle()
    assert _names(journal) == [f"{journal.segment:012d}.log"]
    journal.close()


def test_closing_one_of_two_held_sessions_drops_only_its_records(tmp_path: Path) -> None:
    """Its END is in a segment trimmed later: its held records must go now, or a restart
    would bring it back; the other's stay."""
    _two_old_segments(tmp_path)
    journal = Journal(tmp_path / "journal")
    list(journal.open())
    mine, other = [jr.create(SID, {"model": "tok"})], [jr.create("s_other", {"model": "tok"})]
    assert journal.hold({SID: mine, "s_other": other})
    journal.start()
    journal.drop_before(journal.segment)  # the segments read
    journal.release(SID)
    journal.close()
    assert [r.session_id for r in Journal(tmp_path / "journal").open()] == ["s_other"]


def test_held_records_that_cannot_be_written_keep_every_segment_read_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _two_old_segments(tmp_path)
    journal = Journal(tmp_path / "journal")
    list(journal.open())
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "full")))
    assert not journal.hold({SID: [jr.create(SID, {"model": "tok"})]})
    monkeypatch.undo()
    assert _names(journal) == ["000000000001.log", "000000000002.log"]  # nothing left over
    journal.close()


def test_a_held_segment_write_a_crash_cut_short_is_removed_at_open(tmp_path: Path) -> None:
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    stray = journal_dir / "000000000007.held"
    stray.write_bytes(b"half a copy")
    list(Journal(journal_dir).open())
    assert not stray.exists()

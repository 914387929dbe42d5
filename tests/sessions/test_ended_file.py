"""The journal's `ended` file: why sessions ended, kept past their END records. A damaged or
cut-short file is read as far as it can be (damage logged and counted), never refused; appends
carry the ends of the segments deleted; the file stays bounded."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from service.sessions import ended_file, record_files
from service.sessions.ended_file import ENDED_FILE, EndedFile, line
from service.sessions.journal import Journal
from service.sessions.journal_record import create, end

A = ("s_r.aaaa", "closed", "alice")
B = ("s_r.bbbb", "expired", 'bob "the" builder')  # a space and quotes in an owner
C = ("s_r.cccc", "closed", "")


def _file(directory: Path, **options: int) -> EndedFile:
    return EndedFile(directory, durable=True, **options)


def test_ends_carried_with_their_segments_come_back_in_order(tmp_path: Path) -> None:
    kept = _file(tmp_path)
    assert kept.read() == []  # no file yet
    kept.note(3, A)
    kept.note(4, B)
    kept.note(4, ("s_r.dddd", "lost", ""))  # refused at a start: not an answer to keep
    kept.note(5, C)
    assert kept.carry(4)  # the segments up to 4 are deleted: A and B must be kept now
    assert _file(tmp_path).read() == [A, B]
    assert kept.carry(None)  # a shutdown: all
    assert _file(tmp_path).read() == [A, B, C]


def test_a_damaged_file_is_read_as_far_as_it_can_be(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flipped = bytearray(line(B))
    flipped[12] ^= 0x01  # in its session id: the checksum fails
    (tmp_path / ENDED_FILE).write_bytes(
        line(A) + bytes(flipped) + b"\x00\xffnot a line at all\n" + line(C) + line(A)[:9]
    )
    kept = _file(tmp_path)
    with caplog.at_level(logging.INFO):
        assert kept.read() == [A, C]  # the damaged two skipped, the cut-short last one dropped
    assert kept.damaged == 2
    assert "2 damaged lines skipped" in caplog.text and "cut short" in caplog.text
    kept.note(7, B)
    assert kept.carry(7)  # appended on a line of its own, after the cut-short one
    assert _file(tmp_path).read() == [A, C, B]
    assert kept.rewrite([A, C, B])  # a start writes it anew: nothing damaged left
    again = _file(tmp_path)
    assert again.read() == [A, C, B] and again.damaged == 0
    assert (tmp_path / ENDED_FILE).read_bytes() == line(A) + line(C) + line(B)


@pytest.mark.parametrize("cut", [0, 5, 40])
def test_a_truncated_file_keeps_its_whole_lines(tmp_path: Path, cut: int) -> None:
    whole = line(A) + line(B)
    (tmp_path / ENDED_FILE).write_bytes(whole[: len(line(A)) + cut])
    kept = _file(tmp_path)
    assert kept.read() == [A] and kept.damaged == 0


def test_an_unreadable_file_starts_with_no_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / ENDED_FILE).mkdir()  # reading it fails (EISDIR)
    kept = _file(tmp_path)
    assert kept.read() == []
    assert "could not read" in caplog.text
    assert kept.rewrite([A])  # not replaced: the ends stay noted, for the next append
    assert not kept.carry(None)  # which the directory refuses too
    assert "could not append" in caplog.text


def test_a_file_unreadable_at_the_start_is_kept_and_appended_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails at a start (an I/O error that passes) must not lose what the file
    holds: the start's rewrite replaced it with the journal's ends alone, for good."""
    before = _file(tmp_path)
    before.note(1, A)
    assert before.carry(None)
    real = ended_file.read_file

    def failing(path: str) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ended_file, "read_file", failing)
    kept = _file(tmp_path)
    assert kept.read() == []
    monkeypatch.setattr(ended_file, "read_file", real)
    assert kept.rewrite([B])  # what the journal's segments said at this start
    kept.note(2, C)
    assert kept.carry(None)
    assert _file(tmp_path).read() == [A, B, C]


def test_a_name_whose_sync_failed_is_synced_at_the_next_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's first append fsyncs the directory, so its name survives a power loss; when
    that fsync failed, the next append did not try again (the file existed by then)."""
    synced: list[Path] = []

    def fsync_dir(path: Path) -> None:
        synced.append(path)
        if len(synced) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ended_file, "fsync_dir", fsync_dir)
    kept = _file(tmp_path)
    kept.note(1, A)
    assert not kept.carry(None)  # the data is written; its name is not known durable
    kept.note(2, B)
    assert kept.carry(None)
    assert synced == [tmp_path, tmp_path]
    kept.note(3, C)
    assert kept.carry(None)
    assert len(synced) == 2  # once it held, not at every append


def test_a_refused_append_keeps_its_ends_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = _file(tmp_path)
    kept.note(1, A)
    real = record_files.write_all

    def full(fd: int, data: bytes, path: str) -> None:
        real(fd, data[:10], path)  # a part of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_files, "write_all", full)
    assert not kept.carry(1)
    monkeypatch.setattr(record_files, "write_all", real)
    kept.note(2, B)
    assert kept.carry(2)
    reread = _file(tmp_path)
    assert reread.read() == [A, B] and reread.damaged == 1  # the part written is damage now


def test_the_file_is_bounded_each_id_once_the_newest_kept(tmp_path: Path) -> None:
    kept = _file(tmp_path, bound=3)
    ids = [f"s_r.{n:04d}" for n in range(8)]
    for seq, sid in enumerate(ids, start=1):
        kept.note(seq, (sid, "closed", ""))
        assert kept.carry(seq)
    kept.note(9, (ids[5], "expired", ""))  # ended again: its newest line counts
    assert kept.carry(9)
    lines = (tmp_path / ENDED_FILE).read_bytes().count(b"\n")
    assert lines <= 6  # compacted whenever appends take it past twice the bound
    assert _file(tmp_path, bound=3).read() == [
        (ids[6], "closed", ""), (ids[7], "closed", ""), (ids[5], "expired", "")
    ]  # fmt: skip
    assert kept.rewrite([(sid, "closed", "") for sid in ids]) and len(_file(tmp_path).read()) == 3


def test_the_journal_keeps_an_end_before_deleting_its_segment(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", fsync="batch", segment_bytes=64, checkpoints=tmp_path)
    list(journal.open())
    journal.start()
    try:
        seq = journal.append([create("s_r.aaaa", {"model": "tok"})])
        journal.pin(seq)
        journal.append([end("s_r.aaaa", 0, "closed")])
        journal.note_end(*A)
        journal.append([create("s_r.bbbb", {"model": "tok"})])  # rolls on: 64-byte segments
        assert journal.segment > seq
        journal.unpin(seq)  # its checkpoint (or its end) released it: deleted by the janitor
        journal.settle()
        assert not (tmp_path / "journal" / f"{seq:012d}.log").exists()
        assert Journal(tmp_path / "journal").ended_sessions() == [A]
    finally:
        journal.close()


def test_a_damaged_ended_file_counts_as_damaged_journal_records(tmp_path: Path) -> None:
    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / ENDED_FILE).write_bytes(line(A) + b"garbage\n" + line(C))
    journal = Journal(tmp_path / "journal")
    assert journal.ended_sessions() == [A, C]
    assert journal.damaged_records == 1


def test_ends_a_refused_append_kept_are_written_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segment goes all the same (its space may be what the disk lacks); its end stays
    noted, and a clean stop writes it."""
    journal = Journal(tmp_path / "journal", fsync="batch", segment_bytes=1)
    list(journal.open())
    journal.start()
    first = journal.append([end("s_r.aaaa", 0, "closed")])
    journal.note_end(*A)
    journal.append([create("s_r.bbbb", {"model": "tok"})])  # the next segment
    real = record_files.write_all

    def full(fd: int, data: bytes, path: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_files, "write_all", full)
    journal.drop_before(journal.segment)
    assert not (tmp_path / "journal" / f"{first:012d}.log").exists()
    assert Journal(tmp_path / "journal").ended_sessions() == []
    monkeypatch.setattr(record_files, "write_all", real)
    journal.close()
    assert Journal(tmp_path / "journal").ended_sessions() == [A]

"""The SQLite state tier's start-up: worker processes opening a new database together.

Two connections creating the tables of a new WAL database at once can fail: a statement that
read the schema and then finds it changed by the other is refused with SQLITE_BUSY_SNAPSHOT
("database is locked") at once, whatever the busy timeout. A worker of `seqserve serve
--workers 2` exited so at start-up in a test run; `check` now takes a lock file first. A
database that cannot be opened names the setting that chose it."""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from pathlib import Path

import pytest

from service.errors import DataLoss, JournalUnavailable, StateTierUnusable
from service.sessions.sqlite_state import SqliteState
from tests.tmpfs import fill, mounted_tmpfs


def test_the_interleaving_that_made_a_worker_exit_is_refused_by_sqlite(tmp_path: Path) -> None:
    """What the lock is for: a schema write on a stale read snapshot is refused outright."""
    path = tmp_path / "state.db"
    a = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    b = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    a.execute("PRAGMA journal_mode=WAL")
    b.execute("BEGIN")
    b.execute("SELECT count(*) FROM sqlite_master").fetchall()  # b reads the schema
    a.execute("CREATE TABLE one (x)")  # a changes it meanwhile
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        b.execute("CREATE TABLE IF NOT EXISTS two (x)")


def test_opening_waits_for_another_process_opening_the_same_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with open(path.with_name("state.db.init-lock"), "a") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # another worker is opening it
        opened = threading.Event()

        def open_it() -> None:
            SqliteState(path).check()
            opened.set()

        worker = threading.Thread(target=open_it)
        worker.start()
        assert not opened.wait(0.5)  # it waits its turn
    assert opened.wait(10)  # and opens once the other is done
    worker.join()
    db = sqlite3.connect(path)
    assert {"holders", "journal", "checkpoints"} <= {
        name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }


def _expires(path: Path, session_id: str) -> float:
    db = sqlite3.connect(path)
    (expires,) = db.execute("SELECT expires FROM holders WHERE sid = ?", (session_id,)).fetchone()
    db.close()
    return float(expires)


def test_a_database_that_cannot_be_opened_names_the_setting_that_chose_it(
    tmp_path: Path,
) -> None:
    """The database is `SEQSERVE_SESSIONS__STATE_URL`'s (`sqlite:PATH`, which `serve --workers`
    sets when it is unset): the message named `SEQSERVE_SESSIONS__SPILL_DIR` alone, which does
    not move a database the state URL names."""
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StateTierUnusable) as err:
        SqliteState(tmp_path / "file" / "state.db").check()
    assert err.value.message.endswith(
        "; check SEQSERVE_SESSIONS__STATE_URL (--state-url sqlite:PATH)"
    )


def test_keep_alive_restarts_the_ttl_only_for_the_holder(tmp_path: Path) -> None:
    """A session forked and never written lives on in the tier, kept alive by its holder; a
    stale copy's keep-alive (another epoch) neither extends it nor is told it holds it."""
    path = tmp_path / "state.db"
    state = SqliteState(path)
    state.check()
    assert state.checkpoint("s1", 1, 1_000, b"checkpoint", first=True)
    made = _expires(path, "s1")
    assert state.keep_alive("s1", 2, 60_000) == 1  # not its epoch: untouched
    assert _expires(path, "s1") == made
    assert state.keep_alive("s1", 1, 60_000) == 1
    assert _expires(path, "s1") > made + 50
    assert state.keep_alive("nobody", 1, 60_000) == 0
    state.close()


def test_a_claim_of_a_damaged_session_still_fences_its_last_holder(tmp_path: Path) -> None:
    """A takeover that finds the session's checkpoint damaged refuses it (DATA_LOSS), but its
    claim stands, as on Redis: the replica that held it can write nothing more at its epoch
    (the refusal rolled the claim back, and the old holder went on writing)."""
    path = tmp_path / "state.db"
    holder, taker = SqliteState(path, replica="a"), SqliteState(path, replica="b")
    holder.check()
    taker.check()
    assert holder.checkpoint("s1", 1, 60_000, b"not a spill record", first=True)
    with pytest.raises(DataLoss):
        taker.claim("s1")
    assert taker.epoch_of("s1") == 2  # fenced: the holder's epoch 1 is no longer the session's
    assert not holder.checkpoint("s1", 1, 60_000, b"late write")  # refused at its old epoch
    holder.close()
    taker.close()


def test_a_full_disk_is_named_as_such_not_as_an_unreachable_tier(tmp_path: Path) -> None:
    """Before, every SQLite error while serving said the tier was "unreachable": an operator
    with a full disk looked for a network fault. The answer now carries SQLite's own words
    (UNAVAILABLE still: nothing was applied, a retry may land once there is room), on a real
    full disk. (A Redis that cannot be reached is still "unreachable".)"""
    with mounted_tmpfs(tmp_path / "disk", "size=1m") as disk:
        state = SqliteState(disk / "state.db")
        state.check()
        fill(disk)
        record = bytes(range(256)) * 64  # 16 KiB: more than any page left
        with pytest.raises(JournalUnavailable) as refused:
            for k in range(64):
                state.checkpoint(f"s{k}", 1, 60_000, record, first=True)
        message = str(refused.value)
        assert "full" in message and "unreachable" not in message, message
        assert "SEQSERVE_SESSIONS__STATE_URL" in message and "nothing was applied" in message
        state.close()

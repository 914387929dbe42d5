"""The SQLite backend of the shared state tier (`shared_tier.py`): the worker processes of
`seqserve serve --workers N` on one box share one database file in the state directory.

Tables: `holders` (session → epoch, holder, expiry), `checkpoints` (session → spill record),
`journal` (records since each session's checkpoint, in order) and `ended` (why a session
ended, for a day). Each operation is one transaction (`BEGIN IMMEDIATE`: one writer at a
time), so the epoch check and the write are atomic, as in Redis's scripts. WAL mode; the fsync
policy maps to `synchronous` (batch: FULL, interval: NORMAL, never: OFF). A transaction's write
lock lasts for that transaction only: between writes nothing is held, so a frozen worker keeps
nothing from the others (a worker frozen inside a transaction holds it for `busy_timeout`, then
the others answer UNAVAILABLE until it wakes). Expiry uses the wall clock of the box, which all
workers share.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from pathlib import Path

from service.errors import DataLoss, StateTierUnusable
from service.security import token_bucket
from service.sessions.shared_tier import Claimed, SharedState, Write

_SYNCHRONOUS = {"batch": "FULL", "interval": "NORMAL", "never": "OFF"}
_ENDED_SECONDS = 86_400.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS holders (
    sid TEXT PRIMARY KEY, epoch INTEGER NOT NULL, holder TEXT NOT NULL, expires REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS holders_by_owner ON holders (owner, expires);
CREATE TABLE IF NOT EXISTS buckets (owner TEXT PRIMARY KEY, level REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (sid TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, sid TEXT NOT NULL, record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_by_session ON journal (sid, seq);
CREATE TABLE IF NOT EXISTS ended (sid TEXT PRIMARY KEY, why TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS made (
    made_by TEXT PRIMARY KEY, sid TEXT NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS made_by_session ON made (sid);
"""


class SqliteState(SharedState):
    def __init__(
        self,
        path: Path,
        *,
        fsync: str = "interval",
        replica: str | None = None,
        in_state_dir: str = "",
    ) -> None:
        """`in_state_dir`: for the database `serve --workers` keeps in the state directory
        (`WORKERS_DATABASE`), the variable that set that directory, which its messages name
        (what the operator set) in place of the state URL the supervisor set."""
        super().__init__(f"sqlite:{path}", replica)
        self.path = path
        self._in_state_dir = in_state_dir
        self.setting = in_state_dir or self.setting
        self.fsync = fsync
        self._lock = threading.Lock()  # one connection, used from the loop and from threads
        self._db: sqlite3.Connection | None = None

    def check(self) -> None:
        """Open the database, creating it if need be. Workers starting together take turns
        (a lock file beside it): a connection whose schema read went stale while another
        created tables is refused its own schema write with "database is locked" at once,
        whatever the busy timeout (seen as a worker exiting at start-up)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".init-lock"), "a") as turn:
                fcntl.flock(turn, fcntl.LOCK_EX)  # released when the file is closed
                db = sqlite3.connect(
                    self.path, timeout=5.0, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={_SYNCHRONOUS.get(self.fsync, 'NORMAL')}")
                db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            fix = (
                f"check {self.setting} (--state-url sqlite:PATH)"
                if not self._in_state_dir
                else f"`serve --workers` keeps it in the state directory {self.setting} sets"
            )
            raise StateTierUnusable(
                f"state database {self.path} cannot be used ({exc}); {fix}"
            ) from None
        self._db = db

    # ---- writes ------------------------------------------------------------------------------

    def append(self, writes: list[Write]) -> list[str]:
        now = time.time()

        def work(db: sqlite3.Connection) -> list[str]:
            fenced = []
            lapsed = set()  # "expired" ends of sessions already gone: their tombstone, if none
            for w in writes:
                row = self._holder(db, w.session_id, now)
                if w.op == "create":
                    if row is not None or self._made_elsewhere(db, w.made_by, w.session_id, now):
                        fenced.append(w.session_id)
                elif w.op == "end" and row is None and w.records[0].startswith(b"expired\n"):
                    lapsed.add(w.session_id)
                elif row is None or row[0] != w.epoch:
                    fenced.append(w.session_id)
            if fenced:
                return fenced
            for w in writes:
                expires = now + w.ttl_ms / 1000.0
                if w.op == "end":
                    self._delete(db, w.session_id)
                    if w.session_id in lapsed and self._ended(db, w.session_id, now):
                        continue  # another replica ended it first: its why stands
                    why = w.records[0].decode()
                    db.execute(
                        "INSERT OR REPLACE INTO ended VALUES (?, ?, ?)",
                        (w.session_id, why, now + _ENDED_SECONDS),
                    )
                    continue
                if w.op == "create":
                    db.execute(
                        "INSERT INTO holders VALUES (?, ?, ?, ?, ?)",
                        (w.session_id, w.epoch, self.replica, expires, w.owner),
                    )
                    if w.made_by:
                        self._made(db, w.made_by, w.session_id, expires)
                else:
                    self._live_until(db, w.session_id, expires)
                db.executemany(
                    "INSERT INTO journal (sid, record) VALUES (?, ?)",
                    [(w.session_id, r) for r in w.records],
                )
            return []

        return self._transaction(work)

    def checkpoint(
        self,
        session_id: str,
        epoch: int,
        ttl_ms: int,
        data: bytes,
        *,
        first: bool = False,
        made_by: str = "",
        owner: str = "",
    ) -> bool:
        now = time.time()

        def work(db: sqlite3.Connection) -> bool:
            row = self._holder(db, session_id, now)
            if first:
                if row is not None or self._made_elsewhere(db, made_by, session_id, now):
                    return False
                db.execute(
                    "INSERT INTO holders VALUES (?, ?, ?, ?, ?)",
                    (session_id, epoch, self.replica, now + ttl_ms / 1000.0, owner),
                )
                if made_by:
                    self._made(db, made_by, session_id, now + ttl_ms / 1000.0)
            elif row is None or row[0] != epoch:
                return False
            db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (session_id, data))
            db.execute("DELETE FROM journal WHERE sid = ?", (session_id,))
            self._live_until(db, session_id, now + ttl_ms / 1000.0)
            return True

        return self._transaction(work)

    # ---- reads -------------------------------------------------------------------------------

    def claim(self, session_id: str) -> Claimed:
        return self._read(session_id, take=True)

    def peek(self, session_id: str) -> Claimed:
        return self._read(session_id, take=False)

    def read_checkpoint(self, session_id: str) -> tuple[int, bytes | None]:
        now = time.time()

        def work(db: sqlite3.Connection) -> tuple[int, bytes | None]:
            holder = self._holder(db, session_id, now)
            row = db.execute("SELECT data FROM checkpoints WHERE sid = ?", (session_id,)).fetchone()
            return (0 if holder is None else holder[0]), (None if row is None else bytes(row[0]))

        return self._transaction(work)

    def epoch_of(self, session_id: str) -> int:
        now = time.time()

        def work(db: sqlite3.Connection) -> int:
            row = self._holder(db, session_id, now)
            return 0 if row is None else row[0]

        return self._transaction(work)

    def keep_alive(self, session_id: str, epoch: int, ttl_ms: int, owner: str = "") -> int:
        now = time.time()

        def work(db: sqlite3.Connection) -> int:
            row = self._holder(db, session_id, now)
            if row is None:
                return 0
            if row[0] == epoch:  # its owner's count reads the same expiry
                self._live_until(db, session_id, now + ttl_ms / 1000.0)
            return row[0]

        return self._transaction(work)

    def made(self, made_by: str) -> str:
        now = time.time()

        def work(db: sqlite3.Connection) -> str:
            row = db.execute(
                "SELECT sid FROM made WHERE made_by = ? AND expires >= ?", (made_by, now)
            ).fetchone()
            return "" if row is None else str(row[0])

        return self._transaction(work)

    def _made_elsewhere(
        self, db: sqlite3.Connection, made_by: str, session_id: str, now: float
    ) -> bool:
        """The request `made_by` made another session that still exists: that one is its
        answer (the same request sent to two workers at once), not a second session."""
        if not made_by:
            return False
        row = db.execute(
            "SELECT sid FROM made WHERE made_by = ? AND expires >= ?", (made_by, now)
        ).fetchone()
        if row is None or row[0] == session_id:
            return False
        return self._holder(db, row[0], now) is not None

    @staticmethod
    def _ended(db: sqlite3.Connection, session_id: str, now: float) -> bool:
        row = db.execute(
            "SELECT 1 FROM ended WHERE sid = ? AND expires >= ?", (session_id, now)
        ).fetchone()
        return row is not None

    @staticmethod
    def _live_until(db: sqlite3.Connection, session_id: str, expires: float) -> None:
        """The session's holder row, and the request id that made it (a retry of its create
        or fork finds it for as long as it lives, not one TTL after it was made), live until
        `expires`."""
        db.execute("UPDATE holders SET expires = ? WHERE sid = ?", (expires, session_id))
        db.execute("UPDATE made SET expires = ? WHERE sid = ?", (expires, session_id))

    @staticmethod
    def _made(db: sqlite3.Connection, made_by: str, session_id: str, expires: float) -> None:
        db.execute("INSERT OR REPLACE INTO made VALUES (?, ?, ?)", (made_by, session_id, expires))

    def owned(self, owner: str) -> set[str]:
        now = time.time()

        def work(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT sid FROM holders WHERE owner = ? AND expires >= ?", (owner, now)
            ).fetchall()
            return {str(row[0]) for row in rows}

        return self._transaction(work)

    def take_tokens(self, owner: str, tokens: int, rate: float) -> float:
        now = time.time()

        def work(db: sqlite3.Connection) -> float:
            row = db.execute("SELECT level, at FROM buckets WHERE owner = ?", (owner,)).fetchone()
            level, at = (rate, now) if row is None else (float(row[0]), float(row[1]))
            level, wait = token_bucket.take(level, at, now, tokens, rate)
            db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?)", (owner, level, now))
            return wait

        return self._transaction(work)

    def purge_expired(self) -> int:
        """Delete every session past its expiry (whoever held it): what Redis's key TTLs do."""
        now = time.time()

        def work(db: sqlite3.Connection) -> int:
            gone = [r[0] for r in db.execute("SELECT sid FROM holders WHERE expires < ?", (now,))]
            for sid in gone:
                self._delete(db, sid)
            db.execute("DELETE FROM ended WHERE expires < ?", (now,))
            db.execute("DELETE FROM made WHERE expires < ?", (now,))
            return len(gone)

        return self._transaction(work)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ---- internals ---------------------------------------------------------------------------

    def _read(self, session_id: str, *, take: bool) -> Claimed:
        now = time.time()

        def work(db: sqlite3.Connection) -> Claimed | DataLoss:
            row = self._holder(db, session_id, now)
            if row is None:
                ended = db.execute(
                    "SELECT why FROM ended WHERE sid = ? AND expires >= ?", (session_id, now)
                ).fetchone()
                return self.ended(ended[0]) if ended else Claimed(0, None)
            epoch = int(row[0])
            if take:
                epoch += 1
                db.execute(
                    "UPDATE holders SET epoch = ?, holder = ? WHERE sid = ?",
                    (epoch, self.replica, session_id),
                )
            else:
                epoch = 1
            checkpoint = db.execute(
                "SELECT data FROM checkpoints WHERE sid = ?", (session_id,)
            ).fetchone()
            records = [
                bytes(r[0])
                for r in db.execute(
                    "SELECT record FROM journal WHERE sid = ? ORDER BY seq", (session_id,)
                )
            ]
            data = None if checkpoint is None else bytes(checkpoint[0])
            try:
                return self.claimed(session_id, epoch, data, records)
            except DataLoss as exc:  # damaged: the claim still commits, fencing the last holder
                return exc  # (as Redis's claim, whose epoch is bumped before anything is read)

        claimed = self._transaction(work)
        if isinstance(claimed, DataLoss):
            raise claimed
        return claimed

    def _holder(self, db: sqlite3.Connection, session_id: str, now: float) -> tuple[int] | None:
        row = db.execute(
            "SELECT epoch, expires FROM holders WHERE sid = ?", (session_id,)
        ).fetchone()
        if row is None:
            return None
        if row[1] < now:  # expired on the tier's clock: gone, whoever held it
            self._delete(db, session_id)
            return None
        return (int(row[0]),)

    @staticmethod
    def _delete(db: sqlite3.Connection, session_id: str) -> None:
        for table in ("holders", "checkpoints", "journal"):
            db.execute(f"DELETE FROM {table} WHERE sid = ?", (session_id,))

    def _transaction(self, work):  # type: ignore[no-untyped-def]
        with self._lock:
            db = self._db
            if db is None:
                raise self.unreachable(RuntimeError("the state database is closed"))
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:  # the database's own error: a full disk, say
                raise self.unreachable(exc, failed=True) from None

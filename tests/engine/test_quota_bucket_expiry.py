"""A principal's debt in the shared tier's token bucket (a big generation's charge) is kept
until it is paid off, as the local bucket keeps it: Redis expires the bucket's key only once the
bucket would be full again, and the SQLite tier keeps every bucket. No minute is slept: the key's
TTL is read, and a minute's idleness is made by moving the bucket's last update back. A last
update that reads ahead of the clock refills nothing and drains nothing."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import redis

from service.sessions.redis_state import RedisState
from service.sessions.sqlite_state import SqliteState

RATE = 10.0  # tokens a second, and the bucket's size
CHARGE = 1000  # taken from a full bucket: 990 owed, 100 s until it is full again
REFILL_MS = (CHARGE / RATE) * 1000


def test_a_redis_bucket_in_debt_lives_until_it_would_be_full(redis_url: str) -> None:
    tier = RedisState(redis_url, namespace="quota")
    key = "quota:b:alice"
    client = redis.Redis.from_url(redis_url)
    try:
        assert tier.take_tokens("alice", CHARGE, RATE) == 0.0
        assert client.pttl(key) >= REFILL_MS  # not the minute it had
        at = float(client.hget(key, "at") or 0)
        client.hset(key, "at", str(at - 60))  # a minute idle: the key is still there, and
        assert tier.take_tokens("alice", 1, RATE) > 30  # still owes ~39 s
        assert tier.take_tokens("alice", -(10**6), RATE) == 0.0  # given back: full
        assert client.pttl(key) <= 60_000  # a full bucket may go after a minute, as before
    finally:
        client.close()
        tier.close()


def _sqlite_bucket_moved(tmp_path: Path, tokens: int, seconds: float) -> float:
    """A SQLite tier's bucket for alice after a take of `tokens`, its last update moved by
    `seconds`: what a one-token step is then told to wait."""
    path = tmp_path / "state.db"
    tier = SqliteState(path)
    tier.check()
    try:
        assert tier.take_tokens("alice", tokens, RATE) == 0.0
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE buckets SET at = at + ? WHERE owner = 'alice'", (seconds,))
        return tier.take_tokens("alice", 1, RATE)
    finally:
        tier.close()


def test_a_sqlite_bucket_in_debt_is_kept(tmp_path: Path) -> None:
    assert _sqlite_bucket_moved(tmp_path, CHARGE, -60) > 30  # a minute idle: still owes ~39 s


def test_a_redis_bucket_stored_a_moment_ahead_is_not_drained(redis_url: str) -> None:
    """The time a take stores is to the microsecond, and one before it refills nothing: a
    full bucket whose stored time reads ahead of Redis's clock still lets a step through."""
    tier = RedisState(redis_url, namespace="quota")
    key = "quota:b:alice"
    client = redis.Redis.from_url(redis_url)
    try:
        assert tier.take_tokens("alice", 1, RATE) == 0.0
        at = (client.hget(key, "at") or b"").decode()
        assert len(at.partition(".")[2]) == 6, at  # microseconds, not 14 significant digits
        client.hset(key, mapping={"level": str(RATE), "at": str(float(at) + 5)})
        assert tier.take_tokens("alice", 1, RATE) == 0.0  # was refused: 5 s of refill taken
    finally:
        client.close()
        tier.close()


def test_a_sqlite_bucket_stored_a_moment_ahead_is_not_drained(tmp_path: Path) -> None:
    assert _sqlite_bucket_moved(tmp_path, -1, 5) == 0.0  # made full, then 5 s ahead

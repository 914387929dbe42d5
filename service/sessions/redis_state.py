"""The Redis state tier: sessions any replica can take over (DESIGN section 10).

Per session, three keys (and a tombstone once it ended):

    <ns>:h:<id>   hash: `epoch` (the fencing epoch), `holder` (the replica that holds it)
    <ns>:c:<id>   its checkpoint (a spill record, the same bytes as the local tier's files)
    <ns>:j:<id>   list: its journal records since that checkpoint, oldest first
    <ns>:e:<id>   why it ended ("closed", "expired"), for a day

A replica holds a session at an epoch. Every write of a session — a batch's journal records,
a checkpoint (which also empties the journal), its end (which deletes the keys) — runs in one
Lua script that first checks the epoch: a replica that was taken over (a takeover bumps the
epoch) has every later write refused, whatever state it is in (frozen, partitioned, slow), and
answers UNAVAILABLE. No lock is held: a frozen process keeps nothing from anyone. A batch's
records for many sessions go in one script call (group commit), all or nothing.

Keys expire by the session's TTL on Redis's clock, refreshed by every write, so a session whose
replica died still expires. `RedisJournal` and `RedisCheckpoints` give the engine the journal
and spill-tier interfaces of the local tier over these keys.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import redis

from service.errors import JournalUnavailable, SessionMoved, SpillCorrupted, StateTierUnusable
from service.sessions import spill_record
from service.sessions.journal_record import JournalRecord, decode_stream
from service.sessions.session_store import SessionStore
from service.sessions.spill_record import SpillRecord
from service.sessions.spill_tier import TierScan

log = logging.getLogger(__name__)

_SETTING = "SEQSERVE_SESSIONS__STATE_URL"
_TOMBSTONE_MS = 86_400_000
_CREATE, _END = 4, 5  # journal_record kinds that make and end a session's keys
# The fsync policy each `appendfsync` matches (DESIGN section 10).
_APPENDFSYNC = {"batch": "always", "interval": "everysec", "never": "no"}

# KEYS: per session h, j, c, e. ARGV: replica, sessions, then per session: epoch, ttl ms, op
# ("create", "step", "end"), record count, the records (for "end": the why).
_APPEND = """
local replica = ARGV[1]
local n = tonumber(ARGV[2])
local fenced = {}
local at = 3
local ops = {}
for s = 1, n do
  local h = KEYS[4 * s - 3]
  local epoch, ttl = ARGV[at], tonumber(ARGV[at + 1])
  local op, count = ARGV[at + 2], tonumber(ARGV[at + 3])
  ops[s] = {epoch, ttl, op, at + 4, count}
  at = at + 4 + count
  if op == "create" then
    if redis.call("EXISTS", h) == 1 then table.insert(fenced, s) end
  elseif redis.call("HGET", h, "epoch") ~= epoch then
    table.insert(fenced, s)
  end
end
if #fenced > 0 then return fenced end
for s = 1, n do
  local h, j, c, e = KEYS[4 * s - 3], KEYS[4 * s - 2], KEYS[4 * s - 1], KEYS[4 * s]
  local epoch, ttl, op, first, count = unpack(ops[s])
  if op == "end" then
    redis.call("DEL", h, j, c)
    redis.call("SET", e, ARGV[first], "PX", 86400000)
  else
    if op == "create" then
      redis.call("HSET", h, "epoch", epoch, "holder", replica)
    end
    for k = first, first + count - 1 do redis.call("RPUSH", j, ARGV[k]) end
    redis.call("PEXPIRE", h, ttl)
    redis.call("PEXPIRE", j, ttl)
    redis.call("PEXPIRE", c, ttl)
  end
end
return fenced
"""

# KEYS: h, j, c. ARGV: epoch, ttl ms, checkpoint bytes. 1 when written, 0 when fenced.
_CHECKPOINT = """
if redis.call("HGET", KEYS[1], "epoch") ~= ARGV[1] then return 0 end
redis.call("SET", KEYS[3], ARGV[3], "PX", tonumber(ARGV[2]))
redis.call("DEL", KEYS[2])
redis.call("PEXPIRE", KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS: h, j, c, e. ARGV: replica. {0, why or false} when there is no such session, else
# {new epoch, checkpoint or false, journal records}.
_CLAIM = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {0, redis.call("GET", KEYS[4])} end
local epoch = redis.call("HINCRBY", KEYS[1], "epoch", 1)
redis.call("HSET", KEYS[1], "holder", ARGV[1])
return {epoch, redis.call("GET", KEYS[3]), redis.call("LRANGE", KEYS[2], 0, -1)}
"""

# The same read without taking the session (GetSession on a replica that does not hold it).
_PEEK = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {0, redis.call("GET", KEYS[4])} end
return {1, redis.call("GET", KEYS[3]), redis.call("LRANGE", KEYS[2], 0, -1)}
"""


@dataclass
class Claimed:
    """What the tier holds of a session, read in the same step that took it over."""

    epoch: int  # this replica's epoch from now on (0: the session does not exist)
    checkpoint: SpillRecord | None
    records: list[JournalRecord] = field(default_factory=list)
    ended: str = ""  # when it does not exist: why it ended ("" when it never did)


def replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def redacted(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisState:
    """One replica's connection to the tier, and the scripts."""

    def __init__(
        self,
        url: str,
        *,
        fsync: str = "interval",
        namespace: str = "seqserve",
        replica: str | None = None,
    ) -> None:
        self.url = url
        self.fsync = fsync  # the policy Redis's appendfsync should match
        self.namespace = namespace
        self.replica = replica or replica_name()
        self.client = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, retry_on_timeout=False
        )
        self._append = self.client.register_script(_APPEND)
        self._checkpoint = self.client.register_script(_CHECKPOINT)
        self._claim = self.client.register_script(_CLAIM)
        self._peek = self.client.register_script(_PEEK)
        self.moved: set[str] = set()  # sessions whose writes were refused: another replica has them
        self.failed_writes = 0
        self._failing = False

    def keys(self, session_id: str) -> list[str]:
        ns = self.namespace
        return [f"{ns}:{kind}:{session_id}" for kind in ("h", "j", "c", "e")]

    def check(self) -> None:
        """At start-up: reachable, and configured as the tier needs (see the README). Raises
        StateTierUnusable for what would lose sessions; logs what it cannot check."""
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StateTierUnusable(
                f"state tier {redacted(self.url)} is unreachable ({exc}); check {_SETTING}"
            ) from None
        try:
            config = self.client.config_get("appendonly") | self.client.config_get("appendfsync")
            config |= self.client.config_get("maxmemory-policy")
        except redis.RedisError as exc:  # managed Redis often forbids CONFIG
            log.warning("cannot read the state tier's configuration (%s): check it by hand", exc)
            return
        policy = config.get("maxmemory-policy", "")
        if policy != "noeviction":
            raise StateTierUnusable(
                f"state tier {redacted(self.url)} has maxmemory-policy {policy!r}: an evicting "
                "policy silently drops sessions; set it to noeviction"
            )
        if config.get("appendonly") != "yes":
            raise StateTierUnusable(
                f"state tier {redacted(self.url)} has appendonly off: a Redis restart would "
                "lose every session; set appendonly yes"
            )
        want = _APPENDFSYNC.get(self.fsync)
        if config.get("appendfsync") != want:
            log.warning(
                "state tier appendfsync is %r, the fsync policy %r matches %r",
                config.get("appendfsync"), self.fsync, want,
            )  # fmt: skip

    def claim(self, session_id: str) -> Claimed:
        """Take the session over: bump its epoch (fencing its previous holder) and read it."""
        return self._read(self._claim, session_id, [self.replica])

    def peek(self, session_id: str) -> Claimed:
        """Read the session without taking it (epoch 1 when it exists, 0 when not)."""
        return self._read(self._peek, session_id, [])

    def _read(self, script, session_id: str, args: list[str]) -> Claimed:  # type: ignore[no-untyped-def]
        try:
            reply = script(keys=self.keys(session_id), args=args)
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        epoch = int(reply[0])
        if epoch == 0:
            why = reply[1]
            return Claimed(0, None, ended=why.decode() if why else "")
        checkpoint = None
        if reply[1]:
            checkpoint = spill_record.decode(bytes(reply[1]), f"{self.namespace}:c:{session_id}")
        records = list(decode_stream(b"".join(reply[2]))) if reply[2] else []
        return Claimed(epoch, checkpoint, records)

    def unreachable(self, exc: Exception) -> JournalUnavailable:
        self.failed_writes += 1
        if not self._failing:
            self._failing = True
            log.error("state tier %s failing: %s", redacted(self.url), exc)
        return JournalUnavailable(
            f"session state cannot be made durable: the state tier ({_SETTING}) is "
            "unreachable; the step was not applied, retry later"
        )

    def reachable(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("state tier reachable again after %d failed writes", self.failed_writes)

    def fenced(self, session_ids: list[str]) -> SessionMoved:
        self.moved.update(session_ids)
        return SessionMoved(
            "the step was not applied: a session of its batch is held by another replica now "
            "(taken over); retry"
        )


class RedisJournal:
    """The journal interface of the local tier (`journal.Journal`), over per-session lists."""

    def __init__(self, state: RedisState, sessions: SessionStore) -> None:
        self._state = state
        self._sessions = sessions
        self.oldest = 0
        self.segment = 0

    @property
    def failed_writes(self) -> int:
        return self._state.failed_writes

    def open(self) -> Iterator[JournalRecord]:
        return iter(())  # sessions are read when taken over, not at start-up

    def start(self) -> None:
        pass

    def drop_before(self, seq: int) -> None:
        pass

    def close(self) -> None:
        pass

    def sync(self) -> None:
        pass  # Redis's appendfsync does it

    def pin(self, seq: int) -> None:
        pass  # a checkpoint empties its session's list itself

    def unpin(self, seq: int) -> None:
        pass

    def append(self, records: list[bytes]) -> int:
        """All of a batch's records, every session's epoch checked, in one script call.
        Raises JournalUnavailable (unreachable) or SessionMoved (fenced): nothing written."""
        by_session: dict[str, list[bytes]] = {}
        kinds: dict[str, int] = {}
        for record in records:
            sid_len = record[10]
            sid = record[11 : 11 + sid_len].decode("ascii")
            by_session.setdefault(sid, []).append(record)
            kinds[sid] = record[9]
        keys: list[str] = []
        args: list[bytes | str | int] = [self._state.replica, len(by_session)]
        for sid, batch in by_session.items():
            session = self._sessions.peek(sid)
            epoch = session.holder_epoch if session is not None else 0
            ttl_ms = int((session.ttl_seconds if session is not None else 600.0) * 1000)
            keys += self._state.keys(sid)
            if kinds[sid] == _END:
                (end,) = decode_stream(batch[-1])
                args += [str(epoch), ttl_ms, "end", 1, end.why]
            else:
                op = "create" if kinds[sid] == _CREATE else "step"
                args += [str(epoch), ttl_ms, op, len(batch), *batch]
        try:
            fenced = self._state._append(keys=keys, args=args)
        except redis.RedisError as exc:
            raise self._state.unreachable(exc) from None
        self._state.reachable()
        if fenced:
            sids = list(by_session)
            raise self._state.fenced([sids[int(k) - 1] for k in fenced])
        return 0


class RedisCheckpoints:
    """The spill-tier interface of the local tier (`spill_tier.SpillTier`) over the keys."""

    def __init__(self, state: RedisState, sessions: SessionStore) -> None:
        self._state = state
        self._sessions = sessions
        self.directory = redacted(state.url)
        self.bytes_used = 0  # in Redis; its own memory metrics say how much

    def open(self) -> TierScan:
        return TierScan()  # nothing to index: sessions are read when taken over

    def close(self) -> None:
        self._state.client.close()

    def sync(self) -> None:
        pass

    def mark_clean_stop(self, wall_time: float) -> None:
        pass  # expiry runs on Redis's clock, which did not stop

    def write(self, record: SpillRecord, *, durable: bool = False) -> None:
        """The checkpoint, and its session's journal emptied, if this replica still holds it."""
        sid = record.header.session_id
        session = self._sessions.peek(sid)
        epoch = session.holder_epoch if session is not None else 0
        ttl_ms = int(record.header.ttl_seconds * 1000)
        h, j, c, _ = self._state.keys(sid)
        try:
            written = self._state._checkpoint(
                keys=[h, j, c], args=[str(epoch), ttl_ms, spill_record.encode(record)]
            )
        except redis.RedisError as exc:
            raise self._state.unreachable(exc) from None
        if not written:
            raise self._state.fenced([sid])

    def read(self, session_id: str) -> SpillRecord:
        key = self._state.keys(session_id)[2]
        try:
            data = self._state.client.get(key)
        except redis.RedisError as exc:
            raise self._state.unreachable(exc) from None
        if data is None:
            raise SpillCorrupted(f"checkpoint of session {session_id!r} is missing from the tier")
        return spill_record.decode(bytes(data), key)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return 0

    def delete(self, session_id: str) -> None:
        pass  # its END record deletes the keys, fenced like every write

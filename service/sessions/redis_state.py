"""The Redis backend of the shared state tier (`shared_tier.py`): replicas on several machines.

Per session, three keys (and a tombstone once it ended):

    <ns>:h:<id>   hash: `epoch` (the fencing epoch), `holder` (the replica that holds it)
    <ns>:c:<id>   its checkpoint (a spill record, the same bytes as the local tier's files)
    <ns>:j:<id>   list: its journal records since that checkpoint, oldest first
    <ns>:e:<id>   why it ended ("closed", "expired"), for a day

Each operation is one Lua script, so the epoch check and the write are atomic; a batch's
records for many sessions go in one call (group commit), all or nothing.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import redis

from service.errors import StateTierUnusable
from service.sessions.shared_tier import Claimed, SharedState, Write

log = logging.getLogger(__name__)

_SETTING = "SEQSERVE_SESSIONS__STATE_URL"
# The fsync policy each `appendfsync` matches (DESIGN section 10).
_APPENDFSYNC = {"batch": "always", "interval": "everysec", "never": "no"}

# KEYS: per session h, j, c, e. ARGV: replica, sessions, then per session: epoch, ttl ms, op
# ("create", "step", "end"), the made-by key of a create with a request id (else ""), the
# owner's key (a sorted set of its sessions by expiry; "" with auth off), record count, the
# records (for "end": the why). Returns the
# indexes (1-based) of the sessions whose epoch did not hold; then nothing was written.
_APPEND = """
local replica = ARGV[1]
local n = tonumber(ARGV[2])
local fenced = {}
local at = 3
local ops = {}
for s = 1, n do
  local h = KEYS[4 * s - 3]
  local epoch, ttl = ARGV[at], tonumber(ARGV[at + 1])
  local op, made, owned = ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local count = tonumber(ARGV[at + 5])
  ops[s] = {epoch, ttl, op, at + 6, count, made, owned}
  at = at + 6 + count
  if op == "create" then
    if redis.call("EXISTS", h) == 1 then table.insert(fenced, s) end
  elseif redis.call("HGET", h, "epoch") ~= epoch then
    table.insert(fenced, s)
  end
end
if #fenced > 0 then return fenced end
local clock = redis.call("TIME")
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
for s = 1, n do
  local h, j, c, e = KEYS[4 * s - 3], KEYS[4 * s - 2], KEYS[4 * s - 1], KEYS[4 * s]
  local epoch, ttl, op, first, count, made, owned = unpack(ops[s])
  if op == "end" then
    redis.call("DEL", h, j, c)
    redis.call("SET", e, ARGV[first], "PX", 86400000)
    if owned ~= "" then redis.call("ZREM", owned, h) end
  else
    -- the owner's live sessions, each scored by when it expires (counted by `owned`)
    if owned ~= "" then redis.call("ZADD", owned, now_ms + ttl, h) end
    if op == "create" then
      redis.call("HSET", h, "epoch", epoch, "holder", replica)
      -- made key -> its h key, unless it names a session that still exists: that one is the
      -- request's answer (a create whose answer was lost can land after its retry made
      -- another); one that ended (a prefix's failed step) is made anew
      if made ~= "" then
        local was = redis.call("GET", made)
        if not was or redis.call("EXISTS", was) == 0 then
          redis.call("SET", made, h, "PX", ttl)
        end
      end
    end
    for k = first, first + count - 1 do redis.call("RPUSH", j, ARGV[k]) end
    redis.call("PEXPIRE", h, ttl)
    redis.call("PEXPIRE", j, ttl)
    redis.call("PEXPIRE", c, ttl)
  end
end
return fenced
"""

# KEYS: h, j, c. ARGV: epoch, ttl ms, checkpoint bytes, replica when it is a new session's
# first (a fork: no record made it), else "", then its made-by key and its owner's key (or "").
# 1 when written, 0 when fenced.
_CHECKPOINT = """
if ARGV[4] ~= "" then
  if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
  redis.call("HSET", KEYS[1], "epoch", ARGV[1], "holder", ARGV[4])
  if ARGV[5] ~= "" then  -- as in _APPEND: not over a session that still exists
    local was = redis.call("GET", ARGV[5])
    if not was or redis.call("EXISTS", was) == 0 then
      redis.call("SET", ARGV[5], KEYS[1], "PX", tonumber(ARGV[2]))
    end
  end
  if ARGV[6] ~= "" then
    local clock = redis.call("TIME")
    local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
    redis.call("ZADD", ARGV[6], now_ms + tonumber(ARGV[2]), KEYS[1])
  end
elseif redis.call("HGET", KEYS[1], "epoch") ~= ARGV[1] then
  return 0
end
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

# KEYS: h, j, c. ARGV: epoch, ttl ms, the owner's key (or ""). The session's epoch (0: no such
# session); when it is ARGV[1], its keys (and its place in its owner's set) live ttl ms more.
_KEEP_ALIVE = """
local epoch = redis.call("HGET", KEYS[1], "epoch")
if not epoch then return 0 end
if epoch == ARGV[1] then
  local ttl = tonumber(ARGV[2])
  redis.call("PEXPIRE", KEYS[1], ttl)
  redis.call("PEXPIRE", KEYS[2], ttl)
  redis.call("PEXPIRE", KEYS[3], ttl)
  if ARGV[3] ~= "" then
    local clock = redis.call("TIME")
    redis.call("ZADD", ARGV[3], clock[1] * 1000 + math.floor(clock[2] / 1000) + ttl, KEYS[1])
  end
end
return tonumber(epoch)
"""

# KEYS: an owner's sorted set. Its live sessions' holder keys (expired ones are dropped first).
_OWNED = """
local clock = redis.call("TIME")
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now_ms)
return redis.call("ZRANGE", KEYS[1], 0, -1)
"""

# KEYS: an owner's token bucket. ARGV: rate per second, tokens. "0" when taken, else the
# seconds until there are enough (a string: Lua numbers become integers in replies). Negative
# tokens are given back, up to a full bucket (`security.token_bucket.take`). The key lives until
# the bucket would be full again (a minute at least): expiry drops only a full bucket, never a
# debt (a big generation's), as the local buckets keep it.
_BUCKET = """
local rate, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call("TIME")
local now = clock[1] + clock[2] / 1000000
local state = redis.call("HMGET", KEYS[1], "level", "at")
local level = tonumber(state[1]) or rate
local at = tonumber(state[2]) or now
level = math.min(rate, level + math.max(0, now - at) * rate)
local needed = math.min(tokens, rate)
local wait = "0"
if tokens < 0 then
  level = math.min(rate, level - tokens)
elseif level < needed then
  wait = tostring((needed - level) / rate + 0.01)
else
  level = level - tokens
end
-- `at` to the microsecond: tostring keeps 14 digits (a tenth of a millisecond of today's
-- clock), so a take right after would read a time before the one stored
redis.call("HSET", KEYS[1], "level", tostring(level), "at", string.format("%.6f", now))
-- formatted: a number argument would go as %.14g, and PEXPIRE refuses "1e+14"
local refill_ms = math.ceil((rate - level) / rate * 1000) + 1000
redis.call("PEXPIRE", KEYS[1], string.format("%d", math.max(60000, refill_ms)))
return wait
"""

# The same read without taking the session (GetSession on a replica that does not hold it).
_PEEK = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {0, redis.call("GET", KEYS[4])} end
return {1, redis.call("GET", KEYS[3]), redis.call("LRANGE", KEYS[2], 0, -1)}
"""


def redacted(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisState(SharedState):
    """One replica's connection to Redis, and the scripts."""

    def __init__(
        self,
        url: str,
        *,
        fsync: str = "interval",
        namespace: str = "seqserve",
        replica: str | None = None,
    ) -> None:
        super().__init__(redacted(url), replica)
        self.url = url
        self.fsync = fsync  # the policy Redis's appendfsync should match
        self.namespace = namespace
        self.client = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, retry_on_timeout=False
        )
        self._append = self.client.register_script(_APPEND)
        self._checkpoint = self.client.register_script(_CHECKPOINT)
        self._claim = self.client.register_script(_CLAIM)
        self._peek = self.client.register_script(_PEEK)
        self._keep_alive = self.client.register_script(_KEEP_ALIVE)
        self._owned = self.client.register_script(_OWNED)
        self._bucket = self.client.register_script(_BUCKET)

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
                f"state tier {self.where} is unreachable ({exc}); check {_SETTING}"
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
                f"state tier {self.where} has maxmemory-policy {policy!r}: an evicting "
                "policy silently drops sessions; set it to noeviction"
            )
        if config.get("appendonly") != "yes":
            raise StateTierUnusable(
                f"state tier {self.where} has appendonly off: a Redis restart would "
                "lose every session; set appendonly yes"
            )
        want = _APPENDFSYNC.get(self.fsync)
        if config.get("appendfsync") != want:
            log.warning(
                "state tier appendfsync is %r, the fsync policy %r matches %r",
                config.get("appendfsync"), self.fsync, want,
            )  # fmt: skip

    def append(self, writes: list[Write]) -> list[str]:
        keys: list[str] = []
        args: list[bytes | str | int] = [self.replica, len(writes)]
        for w in writes:
            keys += self.keys(w.session_id)
            made = self._made_key(w.made_by) if w.made_by else ""
            owned = self._owner_key(w.owner) if w.owner else ""
            args += [str(w.epoch), w.ttl_ms, w.op, made, owned, len(w.records), *w.records]
        try:
            fenced = self._append(keys=keys, args=args)
        except (redis.TimeoutError, redis.ConnectionError) as exc:  # it may have been applied
            raise self.unsure(exc, [w.session_id for w in writes]) from None
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        return [writes[int(k) - 1].session_id for k in fenced]

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
        h, j, c, _ = self.keys(session_id)
        made = self._made_key(made_by) if made_by else ""
        owned = self._owner_key(owner) if owner and first else ""
        args: list[bytes | str | int] = [
            str(epoch), ttl_ms, data, self.replica if first else "", made, owned,
        ]  # fmt: skip
        try:
            return bool(self._checkpoint(keys=[h, j, c], args=args))
        except (redis.TimeoutError, redis.ConnectionError) as exc:  # it may have been applied
            raise self.unsure(exc, [session_id]) from None
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None

    def claim(self, session_id: str) -> Claimed:
        return self._read(self._claim, session_id, [self.replica])

    def peek(self, session_id: str) -> Claimed:
        return self._read(self._peek, session_id, [])

    def read_checkpoint(self, session_id: str) -> tuple[int, bytes | None]:
        h, _, c, _ = self.keys(session_id)
        try:
            with self.client.pipeline(transaction=True) as pipe:  # MULTI: one consistent read
                pipe.hget(h, "epoch")
                pipe.get(c)
                epoch, data = pipe.execute()
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        return (0 if epoch is None else int(epoch)), (None if data is None else bytes(data))

    def epoch_of(self, session_id: str) -> int:
        try:
            epoch = self.client.hget(self.keys(session_id)[0], "epoch")
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        return 0 if epoch is None else int(epoch)  # type: ignore[arg-type]

    def keep_alive(self, session_id: str, epoch: int, ttl_ms: int, owner: str = "") -> int:
        h, j, c, _ = self.keys(session_id)
        owned = self._owner_key(owner) if owner else ""
        try:
            return int(self._keep_alive(keys=[h, j, c], args=[str(epoch), ttl_ms, owned]))
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None

    def made(self, made_by: str) -> str:
        try:
            h = self.client.get(self._made_key(made_by))
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        prefix = f"{self.namespace}:h:"
        return bytes(h).decode().removeprefix(prefix) if h else ""  # type: ignore[arg-type]

    def _made_key(self, made_by: str) -> str:
        return f"{self.namespace}:m:{made_by}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.namespace}:o:{owner}"

    def owned(self, owner: str) -> set[str]:
        try:
            holders = self._owned(keys=[self._owner_key(owner)])
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        prefix = len(f"{self.namespace}:h:")
        return {bytes(h).decode()[prefix:] for h in holders}

    def take_tokens(self, owner: str, tokens: int, rate: float) -> float:
        key = f"{self.namespace}:b:{owner}"
        try:
            return float(self._bucket(keys=[key], args=[rate, tokens]))
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None

    def close(self) -> None:
        self.client.close()

    def _read(self, script, session_id: str, args: list[str]) -> Claimed:  # type: ignore[no-untyped-def]
        try:
            reply = script(keys=self.keys(session_id), args=args)
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        epoch = int(reply[0])
        if epoch == 0:
            why = reply[1]
            return self.ended(why.decode()) if why else Claimed(0, None)
        return self.claimed(session_id, epoch, reply[1] or None, list(reply[2] or []))

"""The Redis tier's Lua scripts (`redis_state.RedisState` registers them): each operation of
the tier is one script, so the epoch check and the write are atomic, and a batch's records
for many sessions go in one call (group commit), all or nothing. The keys are those
`redis_state` describes."""

# KEYS: per session h, j, c, e. ARGV: replica, sessions, then per session: epoch, ttl ms, op
# ("create", "step", "end"), the made-by key of a create with a request id (else ""), the
# owner's key (a sorted set of its sessions by expiry; "" with auth off), record count, the
# records (for "end": the tombstone, "why\nowner"). Returns the indexes (1-based) of the
# sessions whose epoch did not hold; then nothing was written. A create whose made key names
# another session that still exists is refused so too: that session is the request's answer
# (the same request sent to two replicas at once), and a second one must not be made.
# An "expired" end of a session whose keys are gone (they expire one TTL after its last write,
# so they are often gone when its holder ends it at its TTL) writes its tombstone all the same,
# unless it already has one (another replica ended it).
APPEND = """
local function keep_made(h, ttl)  -- the request id that made it lives as long as it does
  local m = redis.call("HGET", h, "made")
  if m and redis.call("GET", m) == h then redis.call("PEXPIRE", m, ttl) end
end
local replica = ARGV[1]
local n = tonumber(ARGV[2])
local fenced = {}
local at = 3
local ops = {}
for s = 1, n do
  local h, e = KEYS[4 * s - 3], KEYS[4 * s]
  local epoch, ttl = ARGV[at], tonumber(ARGV[at + 1])
  local op, made, owned = ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local count = tonumber(ARGV[at + 5])
  local lapsed = false
  if op == "create" then
    if redis.call("EXISTS", h) == 1 then
      table.insert(fenced, s)
    elseif made ~= "" then
      local was = redis.call("GET", made)
      if was and was ~= h and redis.call("EXISTS", was) == 1 then table.insert(fenced, s) end
    end
  else
    local held = redis.call("HGET", h, "epoch")
    if op == "end" and not held and string.sub(ARGV[at + 6], 1, 8) == "expired\\n" then
      lapsed = true
    elseif held ~= epoch then
      table.insert(fenced, s)
    end
  end
  ops[s] = {epoch, ttl, op, at + 6, count, made, owned, lapsed}
  at = at + 6 + count
end
if #fenced > 0 then return fenced end
local clock = redis.call("TIME")
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
for s = 1, n do
  local h, j, c, e = KEYS[4 * s - 3], KEYS[4 * s - 2], KEYS[4 * s - 1], KEYS[4 * s]
  local epoch, ttl, op, first, count, made, owned, lapsed = unpack(ops[s])
  if op == "end" then
    redis.call("DEL", h, j, c)
    if lapsed then
      redis.call("SET", e, ARGV[first], "PX", 86400000, "NX")
    else
      redis.call("SET", e, ARGV[first], "PX", 86400000)
    end
    if owned ~= "" then redis.call("ZREM", owned, h) end
  else
    -- the owner's live sessions, each scored by when it expires (counted by `owned`)
    if owned ~= "" then redis.call("ZADD", owned, now_ms + ttl, h) end
    if op == "create" then
      redis.call("HSET", h, "epoch", epoch, "holder", replica)
      -- made key -> its h key: one naming a session that still exists refused the create
      -- above (that one is the request's answer: a create whose answer was lost can land
      -- after its retry made another); one that ended (a prefix's failed step) is made anew
      if made ~= "" then
        redis.call("SET", made, h, "PX", ttl)
        redis.call("HSET", h, "made", made)
      end
    else
      keep_made(h, ttl)
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
# 1 when written, 0 when fenced (a first one: when the session exists, or its made key names
# another that does).
CHECKPOINT = """
local function keep_made(h, ttl)  -- the request id that made it lives as long as it does
  local m = redis.call("HGET", h, "made")
  if m and redis.call("GET", m) == h then redis.call("PEXPIRE", m, ttl) end
end
if ARGV[4] ~= "" then
  if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
  if ARGV[5] ~= "" then  -- as in APPEND: the request made another session that still exists
    local was = redis.call("GET", ARGV[5])
    if was and was ~= KEYS[1] and redis.call("EXISTS", was) == 1 then return 0 end
  end
  redis.call("HSET", KEYS[1], "epoch", ARGV[1], "holder", ARGV[4])
  if ARGV[5] ~= "" then
    redis.call("SET", ARGV[5], KEYS[1], "PX", tonumber(ARGV[2]))
    redis.call("HSET", KEYS[1], "made", ARGV[5])
  end
  if ARGV[6] ~= "" then
    local clock = redis.call("TIME")
    local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
    redis.call("ZADD", ARGV[6], now_ms + tonumber(ARGV[2]), KEYS[1])
  end
elseif redis.call("HGET", KEYS[1], "epoch") ~= ARGV[1] then
  return 0
else
  keep_made(KEYS[1], tonumber(ARGV[2]))
end
redis.call("SET", KEYS[3], ARGV[3], "PX", tonumber(ARGV[2]))
redis.call("DEL", KEYS[2])
redis.call("PEXPIRE", KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS: h, j, c, e. ARGV: replica. {0, why or false} when there is no such session, else
# {new epoch, checkpoint or false, journal records}.
CLAIM = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {0, redis.call("GET", KEYS[4])} end
local epoch = redis.call("HINCRBY", KEYS[1], "epoch", 1)
redis.call("HSET", KEYS[1], "holder", ARGV[1])
return {epoch, redis.call("GET", KEYS[3]), redis.call("LRANGE", KEYS[2], 0, -1)}
"""

# KEYS: h, j, c. ARGV: epoch, ttl ms, the owner's key (or ""). The session's epoch (0: no such
# session); when it is ARGV[1], its keys (and its place in its owner's set) live ttl ms more.
KEEP_ALIVE = """
local function keep_made(h, ttl)  -- the request id that made it lives as long as it does
  local m = redis.call("HGET", h, "made")
  if m and redis.call("GET", m) == h then redis.call("PEXPIRE", m, ttl) end
end
local epoch = redis.call("HGET", KEYS[1], "epoch")
if not epoch then return 0 end
if epoch == ARGV[1] then
  local ttl = tonumber(ARGV[2])
  keep_made(KEYS[1], ttl)
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
OWNED = """
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
BUCKET = """
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
PEEK = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {0, redis.call("GET", KEYS[4])} end
return {1, redis.call("GET", KEYS[3]), redis.call("LRANGE", KEYS[2], 0, -1)}
"""

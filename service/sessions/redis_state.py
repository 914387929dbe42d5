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
from service.sessions import redis_scripts as lua
from service.sessions.shared_tier import Claimed, SharedState, Write

log = logging.getLogger(__name__)

_SETTING = "SEQSERVE_SESSIONS__STATE_URL"
# The fsync policy each `appendfsync` matches (DESIGN section 10).
_APPENDFSYNC = {"batch": "always", "interval": "everysec", "never": "no"}


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
        self._append = self.client.register_script(lua.APPEND)
        self._checkpoint = self.client.register_script(lua.CHECKPOINT)
        self._claim = self.client.register_script(lua.CLAIM)
        self._peek = self.client.register_script(lua.PEEK)
        self._keep_alive = self.client.register_script(lua.KEEP_ALIVE)
        self._owned = self.client.register_script(lua.OWNED)
        self._bucket = self.client.register_script(lua.BUCKET)

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

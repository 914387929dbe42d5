"""Per-principal quotas: live sessions, and input tokens per second (a token bucket), so one
principal cannot exhaust the server for the others. Over either: RESOURCE_EXHAUSTED with a
`google.rpc.RetryInfo` detail saying when to retry. With auth off there is no principal and no
quota. With a shared state tier (Redis; the workers' SQLite) the counts and buckets live in the
tier, so they hold across replicas; otherwise they are this process's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from service.errors import QuotaExceeded, SeqServeError
from service.security import token_bucket
from service.security.principal import Principal, caller
from service.sessions.session_store import SessionStore
from service.sessions.shared_tier import SharedState

log = logging.getLogger(__name__)


class Quotas:
    def __init__(
        self,
        sessions_per_principal: int,
        tokens_per_second: float,
        shared: SharedState | None = None,
    ) -> None:
        self.sessions_per_principal = sessions_per_principal  # 0: no cap
        self.tokens_per_second = tokens_per_second  # 0: no cap
        self._shared = shared
        self._making: dict[str, _Making] = {}  # sessions being made now, by principal
        self._buckets: dict[str, tuple[float, float]] = {}  # principal → (tokens, at)
        self._lock = threading.Lock()

    # ---- sessions --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def new_session(self, sessions: SessionStore) -> AsyncIterator[Callable[[str], None]]:
        """Around making a session: refused when the caller already has its cap, counting
        the sessions it is making right now (so a burst of creates cannot pass the cap
        together; across replicas, a burst can still pass it by one per replica). The block
        calls what it is given with the new session's id as soon as it has one (see
        `_Making`)."""
        who = caller()
        cap = self.sessions_per_principal
        if who is None or cap <= 0:
            yield _nothing
            return
        making = self._making.setdefault(who.name, _Making())
        try:
            if await self._live(who.name, sessions, making) + making.running >= cap:
                raise self._at_cap(who.name, cap)
            making.running += 1  # no suspension since the check: none raced it
            try:
                yield making.made
            finally:
                making.running -= 1
        finally:
            if making.idle and self._making.get(who.name) is making:
                del self._making[who.name]

    async def _live(self, name: str, sessions: SessionStore, making: _Making) -> int:
        """`name`'s live sessions, but for those still being made: in this process, or in the
        shared tier together with those made here while the tier was read (the read may or
        may not have seen them)."""
        if self._shared is None:
            return sessions.owned_by(name)
        read = object()  # this read's key
        meanwhile: set[str] = set()
        making.reading[read] = meanwhile
        try:
            owned = await asyncio.to_thread(self._shared.owned, name)
        finally:
            del making.reading[read]
        return len(owned | {s for s in meanwhile if sessions.peek(s) is not None})

    @staticmethod
    def _at_cap(name: str, cap: int) -> QuotaExceeded:
        return QuotaExceeded(
            f"{name} has {cap} live sessions, the most one principal may have "
            "(SEQSERVE_SECURITY__SESSIONS_PER_PRINCIPAL); close some",
            retry_after=1.0,
        )

    # ---- tokens per second -----------------------------------------------------------------

    @property
    def charging(self) -> bool:
        """Whether this call is charged at all (a principal calls, and there is a rate)."""
        return self.tokens_per_second > 0 and caller() is not None

    async def charge(self, tokens: int) -> None:
        """Take `tokens` from the caller's bucket (refilled at `tokens_per_second`, holding at
        most a second's worth), or refuse with the time until there are enough. A request
        larger than the bucket is allowed when the bucket is full, and leaves it in debt: the
        rate holds over time. A call cancelled meanwhile is charged nothing."""
        if tokens <= 0:
            return
        who = caller()
        if self._shared is None:  # no suspension: a cancel cannot come in the middle
            await self._take(tokens, who)
            return
        # The tier's take runs in a thread, which a cancel does not stop: taken anyway, the
        # charge is given back (the request never ran), once the take is done.
        take = asyncio.ensure_future(self._take(tokens, who))
        try:
            await asyncio.shield(take)
        except asyncio.CancelledError:
            await asyncio.shield(self._undo(take, who, tokens))
            raise

    async def _undo(self, take: asyncio.Future[None], who: Principal | None, tokens: int) -> None:
        """Give back what `take` took from `who`, once it is done (nothing if it refused)."""
        try:
            await take
        except SeqServeError:
            return
        await self._give_back(who, tokens)

    async def refund(self, tokens: int) -> None:
        """Give back what `charge` took for a request that was then refused before it ran (an
        unknown session, a bad argument, a step the journal refused): a refused request changes
        nothing, its charge included. Never past a full bucket. Best effort: a shared tier that
        cannot be reached keeps the charge (the caller's refusal stands as it was)."""
        await self._give_back(caller(), tokens)

    async def reserve(self, tokens: int) -> Reservation:
        """`charge(tokens)` for a request whose size is known only once it ends (a generation:
        its prompt and the most it may generate); its `Reservation` gives back the unused
        part then."""
        await self.charge(tokens)
        return Reservation(self, caller(), tokens)

    async def _give_back(self, who: Principal | None, tokens: int) -> None:
        """`refund` to `who`'s bucket."""
        if tokens <= 0:
            return
        try:
            await self._take(-tokens, who)
        except SeqServeError as exc:
            log.warning("quota refund of %d tokens not made: %s", tokens, exc)

    @contextlib.asynccontextmanager
    async def charged(self, tokens: int) -> AsyncIterator[None]:
        """`charge(tokens)` around a request, refunded if the request is refused (raises a
        `SeqServeError`)."""
        await self.charge(tokens)
        try:
            yield
        except SeqServeError:
            await self.refund(tokens)
            raise

    async def _take(self, tokens: int, who: Principal | None) -> None:
        """`token_bucket.take` on `who`'s bucket: local, or in the shared tier."""
        rate = self.tokens_per_second
        if who is None or rate <= 0:
            return
        if self._shared is not None:
            wait = await asyncio.to_thread(self._shared.take_tokens, who.name, tokens, rate)
            if wait > 0:
                raise self._over(who.name, rate, wait)
            return
        now = time.monotonic()
        with self._lock:
            level, at = self._buckets.get(who.name, (rate, now))
            level, wait = token_bucket.take(level, at, now, tokens, rate)
            self._buckets[who.name] = (level, now)
        if wait > 0:
            raise self._over(who.name, rate, wait)

    @staticmethod
    def _over(name: str, rate: float, wait: float) -> QuotaExceeded:
        return QuotaExceeded(
            f"{name} is over its {rate:g} input tokens per second "
            "(SEQSERVE_SECURITY__TOKENS_PER_SECOND); slow down",
            retry_after=wait,
        )


def _nothing(_session_id: str) -> None:
    """`new_session`'s callback where nothing is counted."""


class _Making:
    """One principal's sessions being made in this process, which its count in the shared tier
    may not show yet. A session counts in `running` until the block making it has it, in the
    step of the event loop that wrote its row to the tier: a read of the tier begun before
    then may or may not see it, so each read running then is told its id (`reading`); one
    begun after sees its row."""

    __slots__ = ("reading", "running")

    def __init__(self) -> None:
        self.running = 0  # creates and forks past the check, not yet made
        self.reading: dict[object, set[str]] = {}  # each read running: the ids made since

    def made(self, session_id: str) -> None:
        for meanwhile in self.reading.values():
            meanwhile.add(session_id)

    @property
    def idle(self) -> bool:
        return self.running == 0 and not self.reading


class Reservation:
    """Tokens charged up front, for one caller, by a request that may use fewer (a generation
    that stops early, is cancelled, or fails): `settle` gives the rest back once it ends. Keeps
    its caller: a cancelled call's clean-up may run where no caller is set."""

    __slots__ = ("_quotas", "_settled", "_who", "tokens")

    def __init__(self, quotas: Quotas, who: Principal | None, tokens: int) -> None:
        self._quotas = quotas
        self._who = who
        self.tokens = tokens  # charged
        self._settled = False

    async def settle(self, used: int) -> None:
        """Give back the tokens charged beyond `used` (all of them at 0: the request was
        refused or cancelled before it ran), never past a full bucket (`Quotas.refund`). Only
        the first call gives back. Shielded: a call cancelled again meanwhile still does."""
        if self._settled:
            return
        self._settled = True
        unused = self.tokens - min(max(used, 0), self.tokens)
        if unused > 0:
            await asyncio.shield(self._quotas._give_back(self._who, unused))

"""The transport-free core: sessions over model versions.

The gRPC servicers are glue around this class: they convert protobuf to these calls and back.
Every public method raises only `service.errors` types for conditions a client can cause. The
work is done by its parts, each built by the composition root (`service.wiring`):

- `SessionLifecycle`: create, fork, close; expiry by the sweeper;
- `SessionFeeder`: feeds (steps) and generations;
- `SessionLeases`: who runs on a session and when (lookup, turn, restore, release);
- `SessionResidency` and the spill tier: where each session's state lives;
- `ServedVersions`: the loaded model versions, each with its pool, runner and scheduler;
- built here: `RequestCharges` (what each request costs the caller's quota) and
  `OrderedTakeover` (a request's sessions taken over from a shared tier in its line's order).

This class owns what is left: start-up (index the spill tier, start the sweeper and the store
watcher), draining, shutdown (its parts stopped in order; every session in memory is written to
the spill tier by `shutdown_write`), readiness (`Durability.takes_writes`) and a stats snapshot
for the metrics (`engine_stats.snapshot`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from service.engine import engine_stats, shutdown_write
from service.engine.background import Background, Slices, every
from service.engine.durability import Durability
from service.engine.engine_stats import EngineStats, VersionStats
from service.engine.feed import Feed, FeedOutcome, PredictionOptions
from service.engine.generation import GeneratedToken
from service.engine.idle_checkpoints import IdleCheckpoints
from service.engine.model_input import ModelInput
from service.engine.ordered_takeover import OrderedTakeover
from service.engine.recovery import Recovery
from service.engine.request_charges import RequestCharges
from service.engine.served_versions import ServedVersions
from service.engine.session_feeder import SessionFeeder
from service.engine.session_generator import Applied, SessionGenerator
from service.engine.session_lease import SessionLeases
from service.engine.session_lifecycle import SessionLifecycle
from service.engine.session_line import Line
from service.engine.session_maker import SessionMaker
from service.engine.session_residency import SessionResidency
from service.engine.store_watcher import StoreWatcher
from service.engine.takeover import Takeover
from service.errors import SeqServeError, Unavailable
from service.runtime.sampler import SamplingParams
from service.runtime.state_pool import ByteBudget
from service.security.quotas import Quotas, Reservation
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.state_tier import Checkpoints

__all__ = [
    "Background", "EngineStats", "Feed", "FeedOutcome", "Line", "ModelInput",
    "PredictionOptions", "SessionEngine", "VersionStats",
]  # fmt: skip

log = logging.getLogger(__name__)


class SessionEngine:
    def __init__(
        self,
        *,
        sessions: SessionStore,
        versions: ServedVersions,
        residency: SessionResidency,
        spill: Checkpoints,
        budget: ByteBudget,
        leases: SessionLeases,
        lifecycle: SessionLifecycle,
        feeder: SessionFeeder,
        generator: SessionGenerator,
        watcher: StoreWatcher,
        durability: Durability,
        background: Background,
        takeover: Takeover,
        quotas: Quotas | None = None,
    ) -> None:
        self.durability = durability
        self.takeover = takeover
        self.quotas = quotas or Quotas(0, 0.0)
        self.sessions = sessions
        self.versions = versions
        self.residency = residency
        self.idle_checkpoints = IdleCheckpoints(residency.writer)
        self.spill = spill
        self.budget = budget
        self.leases = leases
        self.lifecycle = lifecycle
        self.feeder = feeder
        self.generator = generator
        self.watcher = watcher
        self._background = background
        self.draining = False
        self._stopped = False
        self.maker = SessionMaker(
            sessions, versions, leases, lifecycle, feeder, self._check_open, takeover,
            self.quotas,
        )  # fmt: skip
        self.charges = RequestCharges(self.quotas, sessions, generator.max_tokens)
        self.ordered = OrderedTakeover(takeover, feeder)  # a request's takeovers, in line order
        self._loops: list[asyncio.Task[None]] = []

    # ---- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        """Index the spill tier (sessions from before a restart), then start the sweepers."""
        await self.takeover.start()
        resumed = await asyncio.to_thread(self.residency.open)
        journal = self.durability.journal
        if journal is not None:
            replays = self.leases.replays
            recovery = Recovery(self.sessions, self.versions, self.residency, replays)
            await recovery.from_journal(journal)
        elif self.durability.kept_ends is not None:
            await self.durability.kept_ends.recall()
        broken = self.sessions.broken
        if resumed or broken:
            log.info(
                "resumed %d sessions from %s (%d refused)",
                resumed, self.spill.directory, len(broken),
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        sweep = every(self._background.sweep_seconds, self.sweep_expired)
        self._loops.append(loop.create_task(sweep, name="ttl-sweeper"))
        if self._background.poll_seconds > 0:
            poll = every(self._background.poll_seconds, self.watcher.poll)
            self._loops.append(loop.create_task(poll, name="registry-poller"))

    def begin_draining(self) -> None:
        """Refuse new work from now on; what is running finishes (first step of a shutdown)."""
        self.draining = True

    async def stop(self) -> None:
        """Refuse new work, finish the steps in flight, write every session in memory to the
        spill tier (fsynced), stop every version."""
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        tasks = [*self._loops, *self.lifecycle.cancel_chores()]
        for task in self._loops:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.leases.replays.stop()  # the batch replaying finishes; the rest stays journaled
        await self.versions.stop_schedulers()
        await shutdown_write.write_for_restart(
            self.residency, self.spill, self.durability.journal, self.leases.replays,
            self._background.write_timeout,
        )  # fmt: skip
        if self.durability.kept_ends is not None:  # every session written: none ends now
            await self.durability.kept_ends.keep()
        await self.versions.close()
        self.spill.close()

    async def settle(self) -> None:
        """Wait for the unloads that ended sessions started in the background."""
        await self.lifecycle.settle()

    async def state_takes_writes(self) -> bool:
        """Whether steps can be made durable on this replica's disk (`Durability.takes_writes`):
        readiness follows it."""
        return await self.durability.takes_writes()

    def stats(self) -> EngineStats:
        """A snapshot for the metrics gauges."""
        return engine_stats.snapshot(
            self.sessions, self.leases.replays, self.spill, self.budget, self.durability,
            self.residency, self.versions,
        )  # fmt: skip

    # ---- sessions ------------------------------------------------------------------------

    async def create_session(
        self,
        model: str,
        version: str = "",
        *,
        seed: int | None = None,
        ttl_seconds: float | None = None,
        default_sampling: SamplingParams | None = None,
        prefix: ModelInput | None = None,
        options: PredictionOptions | None = None,
        request_id: str = "",
        route: str = "",
    ) -> tuple[Session, FeedOutcome | None]:
        """A new session, and the outcome of feeding it `prefix` (see `SessionMaker`)."""
        self._check_open()
        return await self.maker.create(
            model, version, seed, ttl_seconds, default_sampling, prefix, options, request_id,
            route,
        )  # fmt: skip

    def get_session(self, session_id: str) -> Session:
        """The session as this replica has it (see `describe_session` for any replica's)."""
        return self.sessions.get(session_id)

    async def describe_session(self, session_id: str) -> Session:
        """The session wherever it is held; read-only: it does not move it here."""
        local = self.sessions.peek(session_id)
        if not self.takeover.shared or (local is not None and await self.takeover.holds(local)):
            return self.sessions.get(session_id)
        return await self.takeover.describe(session_id)

    async def locate(self, session_id: str) -> None:
        """Take the session over from the shared tier if another replica (or none) holds it."""
        await self.takeover.ensure(session_id)

    async def close_session(self, session_id: str) -> Session:
        await self.takeover.ensure(session_id)
        return await self.lifecycle.close(session_id)

    async def fork_session(
        self,
        session_id: str,
        ttl_seconds: float | None = None,
        seed: int | None = None,
        request_id: str = "",
    ) -> Session:
        self._check_open()
        await self.takeover.ensure(session_id, read_only=True)  # never a stale copy's state
        return await self.maker.fork(session_id, ttl_seconds, seed, request_id)

    async def sweep_expired(self) -> int:
        """End sessions idle past their TTL, and checkpoint those idle with journaled steps."""
        slices = Slices()  # both sweeps share the loop with requests (see `Slices`)
        ended = await self.lifecycle.sweep_expired(slices)
        if self.durability.enabled:
            await self.idle_checkpoints.sweep(self.durability.checkpoint_idle_seconds, slices)
        await self.takeover.purge()
        return ended

    # ---- feeding -------------------------------------------------------------------------

    async def feed(
        self,
        session_id: str,
        inp: ModelInput,
        options: PredictionOptions | None = None,
        line: Line | None = None,
        *,
        expected_position: int | None = None,
        request_id: str = "",
    ) -> FeedOutcome:
        self._check_open()
        feed = Feed(session_id, inp, options or PredictionOptions(), expected_position, request_id)
        entry = self.ordered.enter(line, (session_id,))
        try:
            if not self.quotas.charging:  # the usual case: no closure, no frame for the charge
                return await self.ordered.feed(feed, line, entry)
            return await self.charges.feed(inp, lambda: self.ordered.feed(feed, line, entry))
        finally:
            if entry is not None:
                entry.leave()

    async def feed_many(
        self, feeds: Sequence[Feed], line: Line | None = None
    ) -> list[FeedOutcome | SeqServeError]:
        """Feed many sessions at once (one Stream message's feeds), each with its own outcome:
        the feed's result, or the error that refused that feed alone."""
        if self.draining:
            return [Unavailable("server is draining; retry on another replica")] * len(feeds)
        entry = self.ordered.enter(line, (f.session_id for f in feeds))
        try:
            if not self.quotas.charging:
                return await self.ordered.feed_many(feeds, line, entry)
            return await self.charges.feed_many(
                feeds, lambda admitted: self.ordered.feed_many(admitted, line, entry)
            )
        finally:
            if entry is not None:
                entry.leave()

    async def generate(
        self,
        session_id: str,
        prompt: ModelInput | None = None,
        sampling: SamplingParams | Callable[[SamplingParams], SamplingParams] | None = None,
        line: Line | None = None,
        *,
        expected_position: int | None = None,
        request_id: str = "",
    ) -> AsyncIterator[GeneratedToken]:
        """Sample up to `max_tokens`, one token per step (see `SessionGenerator.generate`).
        `sampling`: the parameters, or how to make them from the session's defaults (known
        once the session is taken over, if it must be: a request's unset fields)."""
        self._check_open()
        entry = self.ordered.enter(line, (session_id,))
        reservation: Reservation | None = None
        try:
            await self.takeover.ensure(session_id, expected_position)
            if callable(sampling):
                sampling = sampling(self.sessions.get(session_id).default_sampling)
            reservation = await self.charges.reserve(session_id, prompt, sampling)
            if entry is not None:
                await entry.turn()  # the lease is taken at the first token, before a suspension
        except BaseException:  # refused, or cancelled in line: charged nothing
            if reservation is not None:
                await reservation.settle(0)
            raise
        finally:
            if entry is not None:
                entry.leave()
        applied = Applied()  # what this call applies itself: what it keeps of its charge
        tokens = self.generator.generate(
            session_id, prompt, sampling, line, expected_position, request_id, applied
        )
        if reservation is None:
            async with contextlib.aclosing(tokens) as stream:  # type: ignore[type-var]
                async for token in stream:
                    yield token
            return
        async for token in self.charges.settled(tokens, prompt, reservation, applied):
            yield token

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")

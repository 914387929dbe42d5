"""The transport-free core: sessions over model versions.

The gRPC servicers are glue around this class: they convert protobuf to these calls and back.
Every public method raises only `service.errors` types for conditions a client can cause.

A session's life: created on the version its model/alias resolves to (pinned there for good);
each request marks it busy, restores it from the spill tier if it was evicted, runs, and touches
its idle clock; it ends when closed or when idle past its TTL. At shutdown every session in
memory is written to the spill tier, and at start-up the tier is indexed, so a restarted server
answers for each one at the same position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

from torch import Tensor

from service.engine.generation import GeneratedToken, Generation
from service.engine.model_input import ModelInput, to_tensor
from service.engine.model_versions import LoadedVersion, ModelVersions, VersionObserver
from service.engine.session_residency import SessionResidency
from service.engine.step_outcome import PredictionOptions, StepOutcome
from service.errors import (
    Aborted,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    SeqServeError,
    SessionExpired,
    SpillCorrupted,
    Unavailable,
    VersionGone,
)
from service.registry.store import ModelStore
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.state_pool import ByteBudget
from service.runtime.step_batch import RowWork
from service.sessions.session import Session, new_session_id
from service.sessions.session_store import SessionStore
from service.sessions.spill_tier import SpillTier
from service.settings import Settings

__all__ = ["ModelInput", "PredictionOptions", "SessionEngine", "StepOutcome"]

log = logging.getLogger(__name__)


class SessionEngine:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        observer: VersionObserver | None = None,
        sessions: SessionStore | None = None,
    ) -> None:
        cfg = settings.sessions
        self.settings = settings
        self.observer = observer or VersionObserver()
        self.budget = ByteBudget(cfg.pool_bytes)
        self.versions = ModelVersions(
            store, settings, self.budget, self._generation_done, self.observer
        )
        # not `or`: an empty store is falsy
        self.sessions = sessions if sessions is not None else SessionStore(cfg.max_sessions)
        self.spill = SpillTier(cfg.spill_dir, cfg.spill_max_bytes)
        self.residency = SessionResidency(
            self.sessions, self.versions, self.spill, self.observer_event, cfg.slot_wait_seconds
        )
        self.draining = False
        self._stopped = False
        self._loops: list[asyncio.Task[None]] = []  # TTL sweeper, registry poller
        self._chores: set[asyncio.Task[None]] = set()  # unloads started when sessions end

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Index the spill tier (sessions from before a restart), then start the sweepers."""
        resumed = await asyncio.to_thread(self.residency.open)
        if resumed or self.residency.broken:
            log.info(
                "resumed %d sessions from %s (%d records refused)",
                resumed, self.spill.directory, len(self.residency.broken),
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        sweep = _every(self.settings.sessions.sweep_interval_seconds, self.sweep_expired)
        self._loops.append(loop.create_task(sweep, name="ttl-sweeper"))
        if self.settings.registry_poll_seconds > 0:
            poll = _every(self.settings.registry_poll_seconds, self.versions.poll)
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
        for task in [*self._loops, *self._chores]:
            task.cancel()
        for task in [*self._loops, *self._chores]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.versions.stop_schedulers()
        written, lost = self.residency.spill_all()
        await asyncio.to_thread(self.spill.sync)
        await asyncio.to_thread(self.spill.mark_clean_stop, self.sessions.wall_clock())
        log.info("spilled %d sessions to %s for a restart", written, self.spill.directory)
        if lost:
            log.error("%d sessions could not be spilled and are lost", lost)
        await self.versions.close()
        self.spill.close()

    async def settle(self) -> None:
        """Wait for the unloads that ended sessions started in the background."""
        while self._chores:
            await asyncio.gather(*list(self._chores), return_exceptions=True)

    def spill_bytes(self) -> int:
        """Bytes the spill tier holds on disk (the metrics gauge)."""
        return self.spill.bytes_used

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
    ) -> tuple[Session, StepOutcome | None]:
        self._check_open()
        ttl = self._ttl(ttl_seconds)
        self.sessions.check_capacity()
        lv = await self.versions.resolve(model, version)
        self._check_open()
        sampling = default_sampling or SamplingParams()
        if lv.tokenizer is not None:
            sampling.validate(lv.config.output_dim, self.settings.engine.max_generate_tokens)
        prefix_tensor = self._to_tensor(lv, prefix) if prefix is not None else None
        if seed is None:
            seed = secrets.randbits(63)
        self.versions.pin(lv.name, lv.version)  # keeps `lv` loaded while a slot is found
        try:
            slot = await self.residency.allocate(lv)
            session = Session(
                session_id=new_session_id(),
                model=lv.name,
                version=lv.version,
                fingerprint=lv.fingerprint,
                slot=slot,
                rng=SessionRng.seeded(seed),
                default_sampling=sampling,
                ttl_seconds=ttl,
                created_at=time.time(),
                last_used=self.sessions.clock(),
                seed=seed,
            )
            self._register(session, lv, "created")
        except BaseException:
            self.versions.unpin(lv.name, lv.version)
            raise
        if prefix_tensor is None:
            return session, None
        session.busy = True
        try:
            outcome = await self._feed(lv, session, prefix_tensor, options)
        finally:
            self._release(session)
        return session, outcome

    def get_session(self, session_id: str) -> Session:
        return self._lookup(session_id)

    async def close_session(self, session_id: str) -> Session:
        session = self._lookup(session_id)
        if session.busy:
            raise Aborted(f"session {session_id!r} has a request in progress")
        self._end(session, "closed")
        return session

    async def fork_session(
        self, session_id: str, ttl_seconds: float | None = None, seed: int | None = None
    ) -> Session:
        """A new session with a copy of the source's state, position and RNG (or a new seed)."""
        self._check_open()
        ttl = self._ttl(ttl_seconds) if ttl_seconds else None
        source, lv = await self._checkout(session_id)
        try:
            self.sessions.check_capacity()
            slot = await self.residency.allocate(lv)  # the source is busy: never evicted
            assert source.slot is not None
            lv.pool.restore(slot, lv.pool.snapshot(source.slot))
            child = Session(
                session_id=new_session_id(),
                model=source.model,
                version=source.version,
                fingerprint=source.fingerprint,
                slot=slot,
                rng=(
                    SessionRng.from_state(source.rng.get_state())
                    if seed is None
                    else SessionRng.seeded(seed)
                ),
                seed=source.seed if seed is None else seed,
                parent_session_id=source.session_id,
                default_sampling=source.default_sampling,
                ttl_seconds=ttl or source.ttl_seconds,
                created_at=time.time(),
                last_used=self.sessions.clock(),
                position=source.position,
            )
            self.versions.pin(child.model, child.version)
            try:
                self._register(child, lv, "forked")
            except BaseException:
                self.versions.unpin(child.model, child.version)
                raise
            return child
        finally:
            self._release(source)

    # ---- inference -----------------------------------------------------------------------

    async def step(
        self, session_id: str, inp: ModelInput, options: PredictionOptions | None = None
    ) -> StepOutcome:
        self._check_open()
        started = time.perf_counter()
        session, lv = await self._checkout(session_id)
        try:
            outcome = await self._feed(lv, session, self._to_tensor(lv, inp), options)
        finally:
            self._release(session)
        self.observer.on_request(lv.name, str(lv.version), time.perf_counter() - started)
        return outcome

    async def step_many(
        self, requests: Sequence[tuple[str, ModelInput, PredictionOptions | None]]
    ) -> list[StepOutcome | SeqServeError]:
        """Feed many sessions at once (one Stream message's items), each with its own outcome:
        the step's result, or the error that refused that item alone. Requests name distinct
        sessions. Sessions already in memory are checked out and queued together with no await
        per item (one group, one future per version); spilled ones take the ordinary path."""
        if self.draining:
            return [Unavailable("server is draining; retry on another replica")] * len(requests)
        started = time.perf_counter()
        outcomes: list[StepOutcome | SeqServeError | None] = [None] * len(requests)
        queued: dict[tuple[str, int], tuple[LoadedVersion, list[tuple[int, Session, RowWork]]]] = {}
        slow: list[int] = []
        for i, (session_id, inp, options) in enumerate(requests):
            try:
                session = self._lookup(session_id)
                lv = self.versions.find(session.model, session.version)
                if session.slot is None or lv is None or lv.unloading or session.closed:
                    slow.append(i)  # needs a load, a restore or a precise error: the full path
                    continue
                if session.busy:
                    raise _busy(session_id)
                row = self._row(lv, session, self._to_tensor(lv, inp), options)
            except SeqServeError as exc:
                outcomes[i] = exc
                continue
            session.busy = True
            self.sessions.touch(session)
            queued.setdefault((lv.name, lv.version), (lv, []))[1].append((i, session, row))
        groups = []
        for lv, items in queued.values():
            try:
                group = lv.scheduler.submit([(session, row) for _, session, row in items])
            except SeqServeError as exc:
                for i, session, _ in items:
                    outcomes[i] = exc
                    self._release(session)
                continue
            # Free the sessions the moment their rows have run, not when this call returns:
            # spilled items below may be waiting for exactly these slots. A cancelled caller
            # leaves them busy until then too, so nothing evicts a slot under a running step.
            group.future.add_done_callback(self._releaser([s for _, s, _ in items]))
            groups.append((lv, items, group))
        slow_work = asyncio.gather(*(self.step(*requests[i]) for i in slow), return_exceptions=True)
        try:
            for lv, items, group in groups:
                results = await asyncio.shield(group.future)
                elapsed = time.perf_counter() - started
                for (i, session, _), result in zip(items, results, strict=True):
                    if isinstance(result, BaseException):
                        outcomes[i] = _as_error(result)
                        continue
                    assert result.prediction is not None
                    outcomes[i] = StepOutcome(
                        session, result.position, result.prediction, result.per_position,
                        lv.tokenizer,
                    )  # fmt: skip
                    self.observer.on_request(lv.name, str(lv.version), elapsed)
            for i, outcome in zip(slow, await slow_work, strict=True):
                outcomes[i] = _as_error(outcome) if isinstance(outcome, BaseException) else outcome
        except asyncio.CancelledError:
            slow_work.cancel()
            raise
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    async def generate(
        self,
        session_id: str,
        prompt: ModelInput | None = None,
        sampling: SamplingParams | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Sample up to `max_tokens`, one token per step; each token is consumed into the
        session. Stopping early (cancel) leaves the session at its last completed step."""
        self._check_open()
        session, lv = await self._checkout(session_id)
        generation: Generation | None = None
        try:
            if lv.tokenizer is None:
                raise InvalidArgument(
                    f"model {lv.name!r} takes feature frames; generation needs a token model"
                )
            params = sampling or session.default_sampling
            params.validate(lv.config.output_dim, self.settings.engine.max_generate_tokens)
            if prompt is not None:
                await self._feed(lv, session, self._to_tensor(lv, prompt), None)
            started = Generation(session, params, lv.tokenizer)
            lv.scheduler.start_generation(started)
            generation = started  # from here the scheduler releases the session
            while True:
                item = await generation.tokens.get()
                if isinstance(item, BaseException):
                    raise Internal("generation step failed") from item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            if generation is None:
                self._release(session)
            else:  # the scheduler releases the session when it retires the generation
                generation.cancelled = True

    # ---- internals: lookup, busy flag, residency -----------------------------------------

    def _lookup(self, session_id: str) -> Session:
        """The live session, or NotFound (saying so if it expired) / DATA_LOSS if its spill
        record was refused at start-up."""
        try:
            session = self.sessions.get(session_id)
        except NotFound:
            broken = self.residency.broken.get(session_id)
            if broken is not None:
                raise SpillCorrupted(
                    f"session {session_id!r} cannot be resumed: its spill record was refused "
                    f"({broken})"
                ) from None
            raise
        if self.sessions.is_expired(session):  # the sweeper has not got to it yet
            self._end(session, "expired")
            raise SessionExpired(f"session {session_id!r} expired after its idle TTL")
        return session

    async def _checkout(self, session_id: str) -> tuple[Session, LoadedVersion]:
        """Mark the session busy and make sure its state is in memory. Release it after."""
        session = self._lookup(session_id)
        if session.busy:
            raise _busy(session_id)
        session.busy = True
        self.sessions.touch(session)
        try:
            lv = await self._pinned_version(session)
            if session.slot is None:
                await self.residency.restore(session, lv)
        except BaseException:
            self._release(session)
            raise
        return session, lv

    async def _pinned_version(self, session: Session) -> LoadedVersion:
        if session.closed:
            raise FailedPrecondition(f"session {session.session_id!r} is closed")
        try:
            lv = await self.versions.get(session.model, session.version)
        except NotFound as exc:
            raise VersionGone(
                f"session {session.session_id!r} runs on {session.model}:{session.version}, "
                f"which can no longer be loaded: {exc.message}"
            ) from exc
        if lv.unloading:
            raise FailedPrecondition(f"{session.model}:{session.version} is unloading")
        return lv

    def _release(self, session: Session) -> None:
        pending = session.pending_step
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _f: self._release(session))
            return
        session.pending_step = None
        session.busy = False
        if not session.closed:
            self.sessions.touch(session)
            self.residency.notify_idle()

    def _releaser(self, sessions: list[Session]) -> Callable[[asyncio.Future[Any]], None]:
        def release(_done: asyncio.Future[Any]) -> None:
            for session in sessions:
                self._release(session)

        return release

    def _generation_done(self, generation: Generation) -> None:
        self._release(generation.session)

    def _register(self, session: Session, lv: LoadedVersion, event: str) -> None:
        """Add a new session whose slot is allocated (and version pinned) to the store."""
        try:
            self.sessions.add(session)
        except SeqServeError:
            assert session.slot is not None
            lv.pool.free(session.slot)
            self.residency.notify_idle()
            raise
        self.observer_event(event, session)

    def _end(self, session: Session, why: str) -> None:
        session.closed = True
        self.sessions.remove(session, why)
        self.residency.discard(session)
        self.residency.notify_idle()
        self.versions.unpin(session.model, session.version)
        self.observer_event(why, session)
        self._chore(self.versions.release_if_unused(session.model, session.version))

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def observer_event(self, event: str, session: Session) -> None:
        self.observer.on_session_event(event, session.model, str(session.version))

    # ---- internals: steps and inputs -----------------------------------------------------

    def _row(
        self,
        lv: LoadedVersion,
        session: Session,
        inputs: Tensor,
        options: PredictionOptions | None,
    ) -> RowWork:
        opts = options or PredictionOptions()
        top_k = opts.top_k or self.settings.engine.default_top_k
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {opts.top_k}")
        assert session.slot is not None
        return RowWork(
            slot=session.slot, inputs=inputs, top_k=top_k, per_position=opts.per_position
        )

    async def _feed(
        self,
        lv: LoadedVersion,
        session: Session,
        inputs: Tensor,
        options: PredictionOptions | None,
    ) -> StepOutcome:
        group = lv.scheduler.submit([(session, self._row(lv, session, inputs, options))])
        try:
            (result,) = await asyncio.shield(group.future)
        except asyncio.CancelledError:
            # The row may already be in the running step, which writes this session's slot:
            # the session stays busy until it settles, so nothing evicts or frees the slot
            # under it. (So a cancelled request's input may still be consumed.)
            session.pending_step = group.future
            raise
        if isinstance(result, BaseException):
            raise result
        assert result.prediction is not None
        return StepOutcome(
            session, result.position, result.prediction, result.per_position, lv.tokenizer
        )

    def _to_tensor(self, lv: LoadedVersion, inp: ModelInput) -> Tensor:
        cap = self.settings.engine.max_chunk_tokens
        return to_tensor(inp, lv.name, lv.config, lv.tokenizer, cap)

    def _ttl(self, requested: float | None) -> float:
        cfg = self.settings.sessions
        if requested is None or requested == 0:
            return cfg.ttl_seconds
        if not 0 < requested <= cfg.max_ttl_seconds:
            raise InvalidArgument(
                f"ttl must be in (0, {cfg.max_ttl_seconds}] seconds, got {requested}"
            )
        return requested

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")

    # ---- background ----------------------------------------------------------------------

    async def sweep_expired(self) -> int:
        """End every session idle past its TTL; returns how many."""
        expired = self.sessions.expired()
        for session in expired:
            self._end(session, "expired")
        return len(expired)


async def _every(seconds: float, work: Callable[[], Awaitable[Any]]) -> None:
    """Run `work` every `seconds` until cancelled; a failure is logged and the loop goes on
    (one bad session must not stop expiry, nor a store caught mid-edit the poller)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except Exception:
            log.exception("background %s failed", getattr(work, "__name__", "task"))


def _busy(session_id: str) -> Aborted:
    return Aborted(
        f"session {session_id!r} has a request in progress; send one request at a time per session"
    )


def _as_error(exc: BaseException) -> SeqServeError:
    """A row's failure as the error its item reports (a bug becomes INTERNAL)."""
    if isinstance(exc, SeqServeError):
        return exc
    internal = Internal("step failed")
    internal.__cause__ = exc
    return internal

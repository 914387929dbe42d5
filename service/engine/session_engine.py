"""The transport-free core: sessions over model versions.

The gRPC servicers are glue around this class: they convert protobuf to these calls and back.
Every public method raises only `service.errors` types for conditions a client can cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.engine.generation import GeneratedToken, Generation
from service.engine.model_versions import LoadedVersion, ModelVersions, VersionObserver
from service.errors import (
    Aborted,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    SeqServeError,
    Unavailable,
)
from service.models import ByteTokenizer
from service.registry.store import ModelStore
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.state_pool import ByteBudget
from service.runtime.step_batch import Prediction, RowResult, RowWork
from service.sessions.session import Session, new_session_id
from service.sessions.session_store import SessionStore
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInput:
    """Exactly one of the three is set."""

    tokens: Sequence[int] | None = None
    text: str | None = None
    frames: Sequence[float] | None = None


@dataclass(frozen=True)
class PredictionOptions:
    top_k: int = 0  # 0 = the server default
    per_position: bool = False


@dataclass
class StepOutcome:
    session: Session
    position: int  # inputs the session has consumed after this step
    prediction: Prediction
    per_position: list[Prediction] = field(default_factory=list)
    tokenizer: ByteTokenizer | None = None  # decodes the prediction's token ids


class SessionEngine:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        observer: VersionObserver | None = None,
        sessions: SessionStore | None = None,
    ) -> None:
        self.settings = settings
        self.budget = ByteBudget(settings.sessions.pool_bytes)
        self.versions = ModelVersions(
            store, settings, self.budget, self._generation_done, observer
        )
        self.sessions = sessions or SessionStore(settings.sessions.max_sessions)
        self.observer = observer or VersionObserver()
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def stop(self) -> None:
        """Refuse new work, finish steps in flight, stop every version."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.versions.close()

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
        sampling = default_sampling or SamplingParams()
        if lv.tokenizer is not None:
            sampling.validate(lv.config.output_dim, self.settings.engine.max_generate_tokens)
        prefix_tensor = self._to_tensor(lv, prefix) if prefix is not None else None
        if seed is None:
            seed = secrets.randbits(63)
        session = Session(
            session_id=new_session_id(),
            model=lv.name,
            version=lv.version,
            fingerprint=lv.fingerprint,
            slot=lv.pool.allocate(),
            rng=SessionRng.seeded(seed),
            default_sampling=sampling,
            ttl_seconds=ttl,
            created_at=time.time(),
            last_used=self.sessions.clock(),
            seed=seed,
        )
        self.sessions.add(session)
        lv.sessions += 1
        self.observer_event("created", session)
        if prefix_tensor is None:
            return session, None
        session.busy = True
        try:
            outcome = await self._feed(lv, session, prefix_tensor, options)
        finally:
            self._release(session)
        return session, outcome

    def get_session(self, session_id: str) -> Session:
        return self.sessions.get(session_id)

    async def close_session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session.busy:
            raise Aborted(f"session {session_id!r} has a request in progress")
        await self._end(session, "closed")
        return session

    async def fork_session(
        self, session_id: str, ttl_seconds: float | None = None, seed: int | None = None
    ) -> Session:
        self._check_open()
        source = self._acquire(session_id)
        try:
            lv = await self._version_of(source)
            self.sessions.check_capacity()
            assert source.slot is not None
            snap = lv.pool.snapshot(source.slot)
            slot = lv.pool.allocate()
            lv.pool.restore(slot, snap)
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
                ttl_seconds=self._ttl(ttl_seconds) if ttl_seconds else source.ttl_seconds,
                created_at=time.time(),
                last_used=self.sessions.clock(),
                position=source.position,
            )
            self.sessions.add(child)
            lv.sessions += 1
            self.observer_event("forked", child)
            return child
        finally:
            self._release(source)

    # ---- inference -----------------------------------------------------------------------

    async def step(
        self, session_id: str, inp: ModelInput, options: PredictionOptions | None = None
    ) -> StepOutcome:
        self._check_open()
        started = time.perf_counter()
        session = self._acquire(session_id)
        try:
            lv = await self._version_of(session)
            outcome = await self._feed(lv, session, self._to_tensor(lv, inp), options)
        finally:
            self._release(session)
        self.observer.on_request(lv.name, str(lv.version), time.perf_counter() - started)
        return outcome

    async def generate(
        self,
        session_id: str,
        prompt: ModelInput | None = None,
        sampling: SamplingParams | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Sample up to `max_tokens`, one token per step; each token is consumed into the
        session. Stopping early (cancel) leaves the session at its last completed step."""
        self._check_open()
        session = self._acquire(session_id)
        generation: Generation | None = None
        try:
            lv = await self._version_of(session)
            if lv.tokenizer is None:
                raise InvalidArgument(
                    f"model {lv.name!r} takes feature frames; generation needs a token model"
                )
            params = sampling or session.default_sampling
            params.validate(lv.config.output_dim, self.settings.engine.max_generate_tokens)
            if prompt is not None:
                await self._feed(lv, session, self._to_tensor(lv, prompt), None)
            generation = Generation(session, params, lv.tokenizer)
            lv.scheduler.start_generation(generation)
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

    # ---- internals -----------------------------------------------------------------------

    async def _feed(
        self,
        lv: LoadedVersion,
        session: Session,
        inputs: Tensor,
        options: PredictionOptions | None,
    ) -> StepOutcome:
        opts = options or PredictionOptions()
        top_k = opts.top_k or self.settings.engine.default_top_k
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {opts.top_k}")
        assert session.slot is not None
        row = RowWork(slot=session.slot, inputs=inputs, top_k=top_k, per_position=opts.per_position)
        result: RowResult = await lv.scheduler.submit(session, row)
        assert result.prediction is not None
        return StepOutcome(
            session, session.position, result.prediction, result.per_position, lv.tokenizer
        )

    def _to_tensor(self, lv: LoadedVersion, inp: ModelInput) -> Tensor:
        """Validate one input chunk against the model; tokens → [T] int64, frames → [T, D]."""
        cfg = lv.config
        cap = self.settings.engine.max_chunk_tokens
        given = [x is not None for x in (inp.tokens, inp.text, inp.frames)]
        if sum(given) != 1:
            raise InvalidArgument("input must set exactly one of tokens, text or frames")
        if inp.frames is not None:
            if cfg.input_kind != "features":
                raise InvalidArgument(f"model {lv.name!r} takes tokens or text, not frames")
            n = len(inp.frames)
            if n == 0 or n % cfg.input_dim:
                raise InvalidArgument(
                    f"frames must be a non-empty multiple of the frame size {cfg.input_dim}; "
                    f"got {n} values"
                )
            if n // cfg.input_dim > cap:
                raise InvalidArgument(f"chunk of {n // cfg.input_dim} frames exceeds {cap}")
            frames = torch.tensor(inp.frames, dtype=torch.float32).view(-1, cfg.input_dim)
            if not bool(torch.isfinite(frames).all()):
                raise InvalidArgument("frames must be finite numbers")
            return frames
        if cfg.input_kind != "tokens" or lv.tokenizer is None:
            raise InvalidArgument(f"model {lv.name!r} takes feature frames, not tokens or text")
        ids = list(inp.tokens) if inp.tokens is not None else lv.tokenizer.encode(inp.text or "")
        if not ids:
            raise InvalidArgument("input is empty")
        if len(ids) > cap:
            raise InvalidArgument(f"chunk of {len(ids)} tokens exceeds the limit of {cap}")
        bad = [t for t in ids if not 0 <= t < cfg.input_dim]
        if bad:
            raise InvalidArgument(
                f"token ids out of range [0, {cfg.input_dim}): {bad[:8]}"
                + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            )
        return torch.tensor(ids, dtype=torch.int64)

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

    def _acquire(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session.busy:
            raise Aborted(
                f"session {session_id!r} has a request in progress; "
                "send one request at a time per session"
            )
        session.busy = True
        self.sessions.touch(session)
        return session

    def _release(self, session: Session) -> None:
        session.busy = False
        if not session.closed:
            self.sessions.touch(session)

    def _generation_done(self, generation: Generation) -> None:
        self._release(generation.session)

    async def _version_of(self, session: Session) -> LoadedVersion:
        if session.closed:
            raise FailedPrecondition(f"session {session.session_id!r} is closed")
        lv = await self.versions.get(session.model, session.version)
        if lv.unloading:
            raise FailedPrecondition(f"{session.model}:{session.version} is unloading")
        return lv

    async def _end(self, session: Session, why: str) -> None:
        session.closed = True
        self.sessions.remove(session, why)
        lv = self.versions.find(session.model, session.version)
        if lv is not None:
            if session.slot is not None:
                lv.pool.free(session.slot)
                session.slot = None
            lv.sessions -= 1
            self.observer_event(why, session)
            await self.versions.release_if_unused(lv)

    def observer_event(self, event: str, session: Session) -> None:
        self.observer.on_session_event(event, session.model, str(session.version))

    async def sweep_expired(self) -> int:
        expired = self.sessions.expired()
        for session in expired:
            await self._end(session, "expired")
        return len(expired)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sessions.sweep_interval_seconds)
            try:
                await self.sweep_expired()
            except SeqServeError:
                log.exception("sweeping expired sessions failed")

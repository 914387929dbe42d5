"""Loaded model versions: each with its model, state pool, runner and step scheduler.

A version is loaded on first use and stays loaded while sessions are pinned to it; once its last
session ends it is unloaded unless it is still what new sessions resolve to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.engine.generation import Generation
from service.engine.step_scheduler import StepScheduler
from service.metrics.stats import StepStats
from service.models import ByteTokenizer, ModelConfig
from service.registry.store import LoadedModel, ModelStore
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import ByteBudget, StatePool
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedVersion:
    name: str
    version: int
    loaded: LoadedModel
    pool: StatePool
    runner: ModelRunner
    scheduler: StepScheduler
    sessions: int = 0  # sessions pinned to this version (in memory or spilled)
    unloading: bool = field(default=False)

    @property
    def config(self) -> ModelConfig:
        return self.loaded.model.config

    @property
    def tokenizer(self) -> ByteTokenizer | None:
        return self.loaded.tokenizer

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint


class VersionObserver:
    """What the versions report upward (metrics); the default does nothing."""

    def on_step(self, stats: StepStats) -> None: ...

    def on_token_times(self, model: str, version: str, ttft: float | None, gap: float | None) -> None: ...

    def on_request(self, model: str, version: str, seconds: float) -> None: ...

    def on_session_event(self, event: str, model: str, version: str) -> None: ...

    def on_loaded(self, lv: LoadedVersion) -> None: ...

    def on_unloaded(self, lv: LoadedVersion) -> None: ...


class ModelVersions:
    def __init__(
        self,
        store: ModelStore,
        settings: Settings,
        budget: ByteBudget,
        on_generation_done: Callable[[Generation], None],
        observer: VersionObserver | None = None,
    ) -> None:
        self.store = store
        self._settings = settings
        self._budget = budget
        self._on_generation_done = on_generation_done
        self._observer = observer or VersionObserver()
        self._loaded: dict[tuple[str, int], LoadedVersion] = {}
        self._loading: dict[tuple[str, int], asyncio.Future[LoadedVersion]] = {}

    def loaded(self) -> list[LoadedVersion]:
        return list(self._loaded.values())

    def find(self, name: str, version: int) -> LoadedVersion | None:
        return self._loaded.get((name, version))

    async def resolve(self, name: str, spec: str) -> LoadedVersion:
        """Resolve `spec` ("" / number / alias) against the store and load that version."""
        version = await asyncio.to_thread(self.store.resolve, name, spec)
        return await self.get(name, version)

    async def get(self, name: str, version: int) -> LoadedVersion:
        key = (name, version)
        lv = self._loaded.get(key)
        if lv is not None:
            return lv
        pending = self._loading.get(key)
        if pending is None:  # one load per version, however many callers wait on it
            pending = asyncio.ensure_future(self._load(name, version))
            self._loading[key] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    async def _load(self, name: str, version: int) -> LoadedVersion:
        engine = self._settings.engine
        loaded = await asyncio.to_thread(self.store.load, name, version, engine.device)
        model = loaded.model
        with torch.inference_mode():
            zero_h = torch.zeros(1, model.config.hidden_size, device=engine.device)
            initial_output = model.head(zero_h)[0]  # what a fresh session predicts
        pool = StatePool(
            model.config,
            initial_output,
            self._budget,
            initial_slots=self._settings.sessions.pool_initial_slots,
            device=engine.device,
        )
        runner = ModelRunner(model, pool)
        observer = self._observer
        scheduler = StepScheduler(
            runner,
            name,
            version,
            max_batch_size=engine.max_batch_size,
            max_queue=engine.max_queue,
            on_stats=observer.on_step,
            on_generation_done=self._on_generation_done,
            on_token_times=lambda ttft, gap: observer.on_token_times(
                name, str(version), ttft, gap
            ),
        )
        scheduler.start()
        lv = LoadedVersion(name, version, loaded, pool, runner, scheduler)
        self._loaded[(name, version)] = lv
        log.info("loaded %s:%d (%s) in %.3fs", name, version, loaded.fingerprint, loaded.load_seconds)
        observer.on_loaded(lv)
        return lv

    async def release_if_unused(self, lv: LoadedVersion) -> None:
        """Unload a version nobody uses that new sessions no longer resolve to."""
        if lv.sessions > 0 or lv.unloading:
            return
        try:
            current = await asyncio.to_thread(self.store.resolve, lv.name, "")
        except Exception:  # the model vanished from the store: nothing resolves to it
            current = None
        if current == lv.version or lv.sessions > 0:
            return
        await self.unload(lv)

    async def unload(self, lv: LoadedVersion) -> None:
        lv.unloading = True
        self._loaded.pop((lv.name, lv.version), None)
        await lv.scheduler.stop()
        lv.pool.close()
        log.info("unloaded %s:%d", lv.name, lv.version)
        self._observer.on_unloaded(lv)

    async def close(self) -> None:
        for lv in list(self._loaded.values()):
            await self.unload(lv)

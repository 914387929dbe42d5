"""Builds a `ServedVersion`: verified weights from the store, a state pool sized by the shared
byte budget, the runner over both, and the version's step scheduler, started."""

from __future__ import annotations

import asyncio
import logging

from service.engine.row_group import Commit
from service.engine.served_version import ServedVersion, VersionObserver
from service.engine.step_scheduler import StepScheduler
from service.registry.store import ModelStore
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import ByteBudget, StatePool
from service.settings import EngineSettings

log = logging.getLogger(__name__)


class VersionLoader:
    def __init__(
        self,
        store: ModelStore,
        budget: ByteBudget,
        engine: EngineSettings,
        initial_slots: int,
        observer: VersionObserver,
        commit: Commit | None = None,
    ) -> None:
        self._commit = commit
        self._store = store
        self._budget = budget
        self._engine = engine
        self._initial_slots = initial_slots
        self._observer = observer

    async def load(self, name: str, version: int) -> ServedVersion:
        """Read and verify the weights (off the loop), then build and start the version."""
        engine = self._engine
        verified = await asyncio.to_thread(self._store.load, name, version, engine.device)
        model = verified.model
        pool = StatePool(
            model.config,
            self._budget,
            initial_slots=self._initial_slots,
            device=engine.device,
            head=model.head,
        )
        runner = ModelRunner(model, pool)
        observer = self._observer
        scheduler = StepScheduler(
            runner,
            name,
            version,
            max_batch_size=engine.max_batch_size,
            max_queue=engine.max_queue,
            inline_max_rows=engine.inline_max_rows,
            on_stats=observer.on_step,
            on_token_times=lambda firsts, gaps: observer.on_token_times(
                name, str(version), firsts, gaps
            ),
            commit=self._commit,
        )
        scheduler.start()
        log.info(
            "loaded %s:%d (%s) in %.3fs", name, version, verified.fingerprint, verified.load_seconds
        )
        return ServedVersion(name, version, verified, pool, runner, scheduler)

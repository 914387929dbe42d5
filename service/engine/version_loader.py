"""Builds a `ServedVersion`: verified weights from the store, a state pool sized by the shared
byte budget, the runner over both, and the version's step scheduler, started.

A version one of whose sessions takes more than the whole budget is refused here, naming the
setting: its pool could never hold a session, and each create would otherwise wait out
`slot_wait_seconds` to hear that every session in memory is busy, with none in memory."""

from __future__ import annotations

import asyncio
import logging

from service.engine.row_group import Commit
from service.engine.served_version import ServedVersion, VersionObserver
from service.engine.step_scheduler import StepScheduler
from service.errors import VersionUnusable
from service.registry.store import ModelStore
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import ByteBudget, StatePool, slot_bytes
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
        self._check_fits(name, version, slot_bytes(model.config))
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

    def _check_fits(self, name: str, version: int, per_session: int) -> None:
        """Refuse the version (FAILED_PRECONDITION) if one session's state is over the budget."""
        limit = self._budget.limit_bytes
        if per_session > limit:
            raise VersionUnusable(
                f"{name}:{version} needs {per_session} bytes of state per session, more than "
                f"the whole state memory budget (SEQSERVE_SESSIONS__POOL_BYTES, {limit} bytes): "
                f"it can hold none of its sessions; raise the setting to at least {per_session}"
            )

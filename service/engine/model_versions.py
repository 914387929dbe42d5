"""Loaded model versions: each with its model, state pool, runner and step scheduler.

A version is loaded on first use and stays loaded while sessions are pinned to it (in memory or
spilled); once its last session ends it is unloaded unless new sessions still resolve to it.
Resolution re-reads the store on every call, so versions published and aliases moved on disk
take effect for the next new session. Before a loaded version takes a new session its files are
checked again (a stat, and a re-hash only when the weights file changed): a version whose files
vanished or fail their digest is refused for new sessions while its running sessions go on.
`poll()` (run every `registry_poll_seconds`) unloads what nothing uses any more and warms the
version an alias moved to.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.engine.generation import Generation
from service.engine.step_scheduler import StepScheduler
from service.errors import DigestMismatch, SeqServeError, VersionUnusable
from service.metrics.stats import StepStats
from service.models import ByteTokenizer, ModelConfig
from service.registry.snapshot import ModelEntry
from service.registry.store import LoadedModel, ModelStore
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import ByteBudget, StatePool
from service.settings import Settings

log = logging.getLogger(__name__)

FileIdentity = tuple[int, int, int]  # (inode, size, mtime ns): changes when the file does


@dataclass
class LoadedVersion:
    name: str
    version: int
    loaded: LoadedModel
    pool: StatePool
    runner: ModelRunner
    scheduler: StepScheduler
    weights_path: Path
    weights_identity: FileIdentity | None  # the weights file as last verified
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

    def on_token_times(
        self, model: str, version: str, ttft: float | None, gap: float | None
    ) -> None: ...

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
        self._pins: dict[tuple[str, int], int] = {}  # sessions per version, loaded or not
        self._defaults: dict[str, int] = {}  # what "" resolved to at the last poll
        self._warm_failed: set[tuple[str, int]] = set()  # logged once, not every poll
        self._problems: dict[str, str] = {}  # what poll() last warned about, by subject
        # Versions whose weights failed their digest, with the file's identity then: skipped
        # when "" / "latest" resolve to the latest version, until the file changes.
        self._refused: dict[tuple[str, int], tuple[FileIdentity | None, str]] = {}

    def loaded(self) -> list[LoadedVersion]:
        return list(self._loaded.values())

    def find(self, name: str, version: int) -> LoadedVersion | None:
        return self._loaded.get((name, version))

    # ---- pins: which versions sessions need ----------------------------------------------

    def pin(self, name: str, version: int) -> None:
        key = (name, version)
        self._pins[key] = self._pins.get(key, 0) + 1
        self._sync_count(key)

    def unpin(self, name: str, version: int) -> None:
        key = (name, version)
        left = self._pins.get(key, 0) - 1
        assert left >= 0, f"unpinned {name}:{version} more often than pinned"
        if left:
            self._pins[key] = left
        else:
            self._pins.pop(key, None)
        self._sync_count(key)

    def pinned(self, name: str, version: int) -> int:
        return self._pins.get((name, version), 0)

    def _sync_count(self, key: tuple[str, int]) -> None:
        lv = self._loaded.get(key)
        if lv is not None:
            lv.sessions = self._pins.get(key, 0)

    # ---- resolving and loading -----------------------------------------------------------

    async def resolve(self, name: str, spec: str) -> LoadedVersion:
        """Resolve `spec` ("" / number / alias) against the store as it is now, and load that
        version; a loaded one is first checked against its files on disk.

        When the spec means "the latest version" (no `production` alias), a version whose
        weights fail their digest is skipped, like one whose manifest is malformed, and the
        next older one is served; asked for by number or alias, it is refused (DATA_LOSS)."""
        entry = await asyncio.to_thread(self.store.model, name)
        version = entry.resolve(spec)
        if not _means_latest(entry, spec):
            return await self._checked(entry, version)
        candidates = [v for v in reversed(entry.usable_versions) if v <= version]
        for i, candidate in enumerate(candidates):
            if i + 1 < len(candidates) and self._still_refused(entry, candidate):
                continue
            weights = entry.path / str(candidate) / _weights_file(entry, candidate)
            before = _identity(weights)
            try:
                return await self._checked(entry, candidate)
            except DigestMismatch as exc:
                if before is not None and _identity(weights) == before:  # not mid-rewrite
                    self._refused[(name, candidate)] = (before, exc.message)
                log.error("%s:%d refused: %s", name, candidate, exc.message)
                if i + 1 == len(candidates):
                    raise
        raise AssertionError("unreachable: the loop returns or raises")

    def default_version(self, entry: ModelEntry) -> int:
        """What "" resolves to for new sessions, skipping digest-refused versions as resolve()
        does; no loading. Raises like ModelEntry.resolve."""
        version = entry.resolve("")
        if not _means_latest(entry, ""):
            return version
        for candidate in reversed(entry.usable_versions):
            if candidate <= version and not self._still_refused(entry, candidate):
                return candidate
        return version

    def refusal(self, name: str, version: int) -> str | None:
        """Why `version` is skipped for new sessions, if its digest failed."""
        found = self._refused.get((name, version))
        return None if found is None else found[1]

    def _still_refused(self, entry: ModelEntry, version: int) -> bool:
        found = self._refused.get((entry.name, version))
        if found is None:
            return False
        weights = entry.path / str(version) / _weights_file(entry, version)
        if _identity(weights) != found[0]:  # the file changed: give it another chance
            del self._refused[(entry.name, version)]
            self._warm_failed.discard((entry.name, version))
            return False
        return True

    async def _checked(self, entry: ModelEntry, version: int) -> LoadedVersion:
        lv = self._loaded.get((entry.name, version))
        if lv is not None:
            await asyncio.to_thread(check_on_disk, lv, entry)
        return await self.get(entry.name, version)

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
        weights_path = self.store.root / name / str(version) / loaded.manifest.weights_file
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
            inline_max_rows=engine.inline_max_rows,
            on_stats=observer.on_step,
            on_generation_done=self._on_generation_done,
            on_token_times=lambda ttft, gap: observer.on_token_times(name, str(version), ttft, gap),
        )
        scheduler.start()
        lv = LoadedVersion(
            name, version, loaded, pool, runner, scheduler, weights_path, _identity(weights_path)
        )
        self._loaded[(name, version)] = lv
        self._sync_count((name, version))
        log.info(
            "loaded %s:%d (%s) in %.3fs", name, version, loaded.fingerprint, loaded.load_seconds
        )
        observer.on_loaded(lv)
        return lv

    # ---- unloading -----------------------------------------------------------------------

    async def release_if_unused(self, name: str, version: int) -> None:
        """Unload a version no session is pinned to that new sessions no longer resolve to."""
        lv = self._loaded.get((name, version))
        if lv is None or lv.sessions > 0 or lv.unloading:
            return
        try:
            entry = await asyncio.to_thread(self.store.model, name)
            current: int | None = self.default_version(entry)
        except SeqServeError:  # the model vanished or is broken: nothing resolves to it
            current = None
        if current == version or lv.sessions > 0 or lv.unloading:
            return
        await self.unload(lv)

    async def unload(self, lv: LoadedVersion) -> None:
        lv.unloading = True
        self._loaded.pop((lv.name, lv.version), None)
        await lv.scheduler.stop()
        lv.pool.close()
        log.info("unloaded %s:%d", lv.name, lv.version)
        self._observer.on_unloaded(lv)

    async def stop_schedulers(self) -> None:
        """Finish the step in flight everywhere and refuse more (shutdown, before spilling)."""
        for lv in list(self._loaded.values()):
            await lv.scheduler.stop()

    async def close(self) -> None:
        for lv in list(self._loaded.values()):
            await self.unload(lv)

    # ---- watching the store --------------------------------------------------------------

    async def poll(self) -> None:
        """Notice what changed on disk: log where new sessions now go and warm that version;
        unload loaded versions whose files broke or that nothing needs any more."""
        snapshot = await asyncio.to_thread(self.store.snapshot)
        for name in sorted({lv.name for lv in self._loaded.values()}):
            await self._follow_default(name, snapshot.models.get(name))
        for lv in list(self._loaded.values()):
            entry = snapshot.models.get(lv.name)
            subject = f"{lv.name}:{lv.version}"
            try:
                if entry is None:
                    raise VersionUnusable(f"model {lv.name!r} is gone from the store")
                await asyncio.to_thread(check_on_disk, lv, entry)
            except SeqServeError as exc:
                self._report(subject, f"refused for new sessions: {exc.message}")
                if lv.sessions == 0 and not lv.unloading:
                    await self.unload(lv)
                continue
            self._report(subject, None)
            if lv.sessions == 0 and not lv.unloading and self._defaults.get(lv.name) != lv.version:
                await self.unload(lv)

    async def _follow_default(self, name: str, entry: ModelEntry | None) -> None:
        try:
            if entry is None:
                raise VersionUnusable(f"model {name!r} is gone from the store")
            default = self.default_version(entry)
        except SeqServeError as exc:
            self._report(name, f"new sessions cannot be served: {exc.message}")
            self._defaults.pop(name, None)
            return
        self._report(name, None)
        previous = self._defaults.get(name)
        if previous is not None and default != previous:
            log.info("new sessions of %s now go to version %d (was %d)", name, default, previous)
        self._defaults[name] = default
        await self._warm(name, default)

    def _report(self, subject: str, problem: str | None) -> None:
        """Log a problem once when it appears and once when it clears, not at every poll."""
        before = self._problems.get(subject)
        if problem == before:
            return
        if problem is None:
            self._problems.pop(subject, None)
            log.info("%s: fine again", subject)
        else:
            self._problems[subject] = problem
            log.warning("%s: %s", subject, problem)

    async def _warm(self, name: str, version: int) -> None:
        key = (name, version)
        if key in self._loaded or key in self._warm_failed:
            return
        try:
            await self.get(name, version)
        except SeqServeError as exc:
            self._warm_failed.add(key)
            log.warning("could not preload %s:%d: %s", name, version, exc.message)


def _means_latest(entry: ModelEntry, spec: str) -> bool:
    spec = spec.strip()
    return spec == "latest" or (spec == "" and "production" not in entry.aliases)


def _weights_file(entry: ModelEntry, version: int) -> str:
    found = entry.entry(version)
    return found.manifest.weights_file if found is not None and found.manifest else ""


def check_on_disk(lv: LoadedVersion, entry: ModelEntry) -> None:
    """Raise unless `lv`'s files are still in the store, unchanged. Blocking (stat, maybe hash).

    VersionUnusable when the folder, manifest or weights file is gone or the manifest now
    describes other weights; DigestMismatch when the weights no longer hash to their digest."""
    what = f"{lv.name}:{lv.version}"
    found = entry.entry(lv.version)
    if found is None:
        raise VersionUnusable(f"{what} is gone from the store; it takes no new sessions")
    if found.problem is not None or found.manifest is None:
        raise VersionUnusable(f"{what} is unusable on disk: {found.problem}")
    if found.manifest.fingerprint() != lv.fingerprint:
        raise VersionUnusable(
            f"{what}: its manifest on disk changed since it was loaded; it takes no new sessions"
        )
    identity = _identity(lv.weights_path)
    if identity is None:
        raise VersionUnusable(f"{lv.weights_path}: missing")
    if identity == lv.weights_identity:
        return
    digest = _sha256_file(lv.weights_path)
    expected = lv.loaded.manifest.weights_sha256
    if digest != expected:
        raise DigestMismatch(
            f"{lv.weights_path}: sha256 mismatch: manifest expects {expected}, file has {digest}"
        )
    lv.weights_identity = identity


def _identity(path: Path) -> FileIdentity | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise VersionUnusable(f"{path}: unreadable: {exc}") from exc
    return digest.hexdigest()

"""Watches the model store while the server runs (`registry_poll_seconds`).

Each poll: log where new sessions of each served model now go and preload that version; unload
served versions whose files broke or that nothing needs any more: no session runs on them and
new sessions no longer ask for them (`ServedVersions.wanted`: not the default version, not
aliased, not named by `engine.preload`; the rule `release_if_unused` follows too). Problems are
logged once when they appear and once when they clear, not at every poll: a store that cannot be
read at all (its path a file, a folder it may not list) too, and then nothing is unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.engine.served_versions import ServedVersions
from service.errors import SeqServeError, VersionUnusable
from service.registry.snapshot import ModelEntry

log = logging.getLogger(__name__)

WARM_RETRY_SECONDS = 60.0
STORE = "the model store"  # the subject of the store's own problems (a model's is its name)


class StoreWatcher:
    def __init__(self, versions: ServedVersions) -> None:
        self._versions = versions
        self._store = versions.store
        self._rule = versions.rule
        self._defaults: dict[str, int] = {}  # what "" resolved to at the last poll
        # Preloads that failed, with when: retried after WARM_RETRY_SECONDS (the files may
        # have been fixed), logged once until they succeed.
        self._warm_failed: dict[tuple[str, int], float] = {}
        self._problems: dict[str, str] = {}  # what was last warned about, by subject

    async def poll(self) -> None:
        try:
            snapshot = await asyncio.to_thread(self._store.snapshot)
        except SeqServeError as exc:  # there, but no folder it can list: nothing to judge by
            self._report(STORE, f"new sessions cannot be served: {exc.message}")
            return
        self._report(STORE, None)
        served = self._versions.served()
        for name in sorted({s.name for s in served}):
            await self._follow_default(name, snapshot.models.get(name))
        for sv in self._versions.served():
            entry = snapshot.models.get(sv.name)
            subject = f"{sv.name}:{sv.version}"
            try:
                if entry is None:
                    raise VersionUnusable(f"model {sv.name!r} is gone from the store")
                await asyncio.to_thread(
                    self._rule.check_unchanged, entry, sv.version, sv.fingerprint
                )
            except SeqServeError as exc:
                self._report(subject, f"refused for new sessions: {exc.message}")
                if sv.sessions == 0 and not sv.unloading:
                    await self._versions.unload(sv)
                continue
            self._report(subject, None)
            wanted = self._versions.wanted(sv, entry, self._defaults.get(sv.name))
            if sv.sessions == 0 and not sv.unloading and not wanted:
                await self._versions.unload(sv)

    async def _follow_default(self, name: str, entry: ModelEntry | None) -> None:
        try:
            if entry is None:
                raise VersionUnusable(f"model {name!r} is gone from the store")
            default = await asyncio.to_thread(self._rule.version_for, entry, "")
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
        if self._versions.find(name, version) is not None:
            return
        failed_at = self._warm_failed.get(key)
        if failed_at is not None and time.monotonic() - failed_at < WARM_RETRY_SECONDS:
            return
        try:
            await self._versions.get(name, version)
        except SeqServeError as exc:
            if key not in self._warm_failed:
                log.warning("could not preload %s:%d: %s", name, version, exc.message)
            self._warm_failed[key] = time.monotonic()
            return
        if self._warm_failed.pop(key, None) is not None:
            log.info("preloaded %s:%d after earlier failures", name, version)

"""The table of served model versions: which are loaded, which sessions need them.

At start-up (`preload`) every version an alias points to, the default one of every model and
those the `engine.preload` setting names are loaded before the server reports ready; any other
version is loaded on first use. A version stays loaded while sessions are pinned to it (in memory
or spilled); once its last session ends it is unloaded unless new sessions still resolve to it
(the default version, an aliased one, or one preloaded by name).
Resolution answers for the store as it is on disk now, so versions published and aliases moved
on disk take effect for the next new session: it reads the store on its reader thread, and keeps
what it read only while the kernel reports no change in the store's folders (`StoreChanges`,
inotify, local filesystems); which version a spec means is the store's rule
(`VersionRule.version_for`), the same one the registry RPCs report. Before a loaded version takes
a new session its files are checked again (a stat; a re-hash only when the weights changed): a
version whose files vanished or fail their digest is refused for new sessions while its running
sessions go on. A loaded version whose manifest on disk now describes other weights (the model
deleted and published again under the same number) is outdated: while sessions run on it, it
serves them and refuses new ones; once none does, it is unloaded (when its last session ends, or
by the next new session that asks for it, which then loads the files on disk), even when it is
the default version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from service.engine.served_version import ServedVersion, VersionObserver
from service.engine.version_loader import VersionLoader
from service.errors import InvalidArgument, NotFound, SeqServeError, VersionUnusable
from service.registry.snapshot import ModelEntry
from service.registry.store import ModelStore
from service.registry.store_changes import StoreChanges
from service.registry.version_rule import VersionRule, republished_reason
from service.registry.version_spec import version_digits

log = logging.getLogger(__name__)

VersionKey = tuple[str, int]
KNOWN_SPECS = 1024  # resolutions kept while the store is unchanged (specs are the clients')


class ServedVersions:
    def __init__(
        self,
        store: ModelStore,
        rule: VersionRule,
        loader: VersionLoader,
        observer: VersionObserver,
        changes: StoreChanges | None = None,
    ) -> None:
        self.store = store
        self.rule = rule
        # Tells when a resolution read earlier still holds; None: read every time.
        self._changes = changes
        self._known: dict[tuple[str, str], tuple[int, int]] = {}  # (name, spec) -> (mark, version)
        self._loader = loader
        self._observer = observer
        self._served: dict[VersionKey, ServedVersion] = {}
        self._loading: dict[VersionKey, asyncio.Future[ServedVersion]] = {}
        self._pins: dict[VersionKey, int] = {}  # sessions per version, loaded or not
        self._preloaded: set[VersionKey] = set()  # named by the preload setting: kept loaded
        # `resolve`'s readings of the store, one per new session, on a thread of their own.
        # Through the default executor (several threads taking turns) a creation cost ~14%
        # more server CPU; two threads of their own were no better than the default one
        # (docs/per-core-passes.md, "Fifth pass").
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-reader")

    def served(self) -> list[ServedVersion]:
        return list(self._served.values())

    def find(self, name: str, version: int) -> ServedVersion | None:
        return self._served.get((name, version))

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

    def _sync_count(self, key: VersionKey) -> None:
        served = self._served.get(key)
        if served is not None:
            served.sessions = self._pins.get(key, 0)

    # ---- resolving and loading -----------------------------------------------------------

    async def resolve(self, name: str, spec: str) -> ServedVersion:
        """The version `spec` ("" / number / alias) means for a new session now, loaded; a
        loaded one is first checked against its files on disk. What a reading found is used
        again, without reading, while the store's folders report no change since before it."""
        changes, key = self._changes, (name, spec_key(spec))
        mark = changes.mark() if changes is not None else 0
        known = self._known.get(key)
        if known is not None and known[0] == mark:
            return await self.get(name, known[1])
        loop = asyncio.get_running_loop()
        try:
            version, watched, outdated = await loop.run_in_executor(
                self._reader, self._pick, name, spec
            )
        except SeqServeError as exc:  # the store's files, named within it: clients read this
            self.store.name_within(exc)
            raise
        if outdated is not None:
            await self._replace(outdated)
        if watched:  # kept with the mark from before it was read: a change meanwhile moved it
            if len(self._known) >= KNOWN_SPECS:
                self._known.clear()
            self._known[key] = (mark, version)
        return await self.get(name, version)

    def _pick(self, name: str, spec: str) -> tuple[int, bool, ServedVersion | None]:
        """`resolve`'s reading of the store, in one trip to the reader thread (three trips cost
        more than the reading): the version `spec` means, checked against its files when it
        is already served, whether the model's folders were watched before it was read (its
        answer may then be kept), and the loaded copy of that version when it is outdated
        (`VersionRule.republished`) and no session runs on it: `_replace` unloads it on the
        event loop. One with sessions is refused here. A re-hash of weights changed on disk
        holds the others up."""
        watched = self._changes is not None and self._changes.watch(name)
        entry = self.store.model(name)
        version = self.rule.version_for(entry, spec)
        served = self._served.get((name, version))  # a dict read: safe from this thread
        if served is not None:
            try:
                self.rule.check_unchanged(entry, version, served.fingerprint)
            except VersionUnusable:  # (only then: a fingerprint per create is enough)
                if served.sessions == 0 and self.rule.republished(
                    entry, version, served.fingerprint
                ):
                    return version, watched, served
                raise
        return version, watched, None

    async def _replace(self, outdated: ServedVersion) -> None:
        """Unload `outdated` (`_pick` found its manifest on disk changed and no session on it)
        so that `get` loads the files on disk; refused as `check_unchanged` refuses if a session
        was pinned to it meanwhile. Another resolve already unloading it: nothing to do."""
        if outdated.sessions > 0:
            raise VersionUnusable(republished_reason(outdated.name, outdated.version))
        if (
            not outdated.unloading
            and self._served.get((outdated.name, outdated.version)) is outdated
        ):
            log.info(
                "%s:%d changed on disk since it was loaded (%s): loading it again",
                outdated.name,
                outdated.version,
                outdated.fingerprint,
            )
            await self.unload(outdated)

    def outdated(self, entry: ModelEntry, version: int) -> ServedVersion | None:
        """The copy of `version` loaded here when it is outdated (`VersionRule.republished`:
        the store's manifest describes other weights), else None. Read by the registry (from a
        thread: dict and attribute reads)."""
        served = self._served.get((entry.name, version))
        if served is None or served.unloading:
            return None
        return served if self.rule.republished(entry, version, served.fingerprint) else None

    def held_refusal(self, entry: ModelEntry, version: int) -> str | None:
        """Why new sessions of `version` are refused although its files on disk serve: its
        loaded copy is outdated and sessions still run on it (what `_pick` refuses); None
        otherwise. The registry reports it (GetModel's status, ListModels, the default)."""
        served = self.outdated(entry, version)
        if served is None or served.sessions == 0:
            return None
        return (
            f"{republished_reason(entry.name, version)} while the {served.sessions} "
            f"session(s) made on the copy loaded (fingerprint {served.fingerprint}) run"
        )

    async def get(self, name: str, version: int) -> ServedVersion:
        """The served version, loading it first if need be (one load however many wait)."""
        key = (name, version)
        served = self._served.get(key)
        if served is not None:
            return served
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key))
            self._loading[key] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    async def _load(self, key: VersionKey) -> ServedVersion:
        served = await self._loader.load(*key)
        self._served[key] = served
        self._sync_count(key)
        self._observer.on_loaded(served)
        return served

    async def preload(self, extra: Sequence[str] = ()) -> list[VersionKey]:
        """Load what new sessions will ask for, before the server says it is ready: every
        aliased version and the default one of every model in the store, and `extra`
        (`model[:version]`, the `engine.preload` setting). A version that fails to load (bad
        digest, unusable files) is logged and skipped: the rest still serve. An `extra` entry
        naming no model, version or alias raises InvalidArgument (a configuration error).
        Returns what is loaded, in load order."""
        wanted: list[VersionKey] = []
        snapshot = await asyncio.to_thread(self.store.snapshot)
        for entry in sorted(snapshot.models.values(), key=lambda e: e.name):
            specs = ["", *sorted(entry.aliases)]
            for spec in specs:
                try:
                    version = await asyncio.to_thread(self.rule.version_for, entry, spec)
                except SeqServeError as exc:
                    log.error("not preloading %s (%s): %s", entry.name, spec or "default", exc)
                    continue
                if (entry.name, version) not in wanted:
                    wanted.append((entry.name, version))
        for item in extra:
            name, _, spec = item.partition(":")
            try:
                entry = await asyncio.to_thread(self.store.model, name)
                version = await asyncio.to_thread(self.rule.version_for, entry, spec)
            except NotFound as exc:
                raise InvalidArgument(f"engine.preload: {item!r}: {exc.message}") from None
            except SeqServeError as exc:  # there, but refused (files, manifest): skipped
                log.error("not preloading %s: %s", item, exc.message)
                continue
            self._preloaded.add((name, version))
            if (name, version) not in wanted:
                wanted.append((name, version))
        loaded: list[VersionKey] = []
        for key in wanted:
            try:
                await self.get(*key)
            except SeqServeError as exc:  # refused (digest, files): the rest still serve
                log.error("could not preload %s:%d: %s", *key, exc.message)
                continue
            loaded.append(key)
        return loaded

    # ---- unloading -----------------------------------------------------------------------

    async def release_if_unused(self, name: str, version: int) -> None:
        """Unload a version no session is pinned to that new sessions no longer resolve to
        (not the default version, not aliased, not preloaded by name), or whose copy is
        outdated (`VersionRule.republished`: new sessions would load the files on disk)."""
        served = self._served.get((name, version))
        if served is None or served.sessions > 0 or served.unloading:
            return
        entry: ModelEntry | None
        current: int | None
        try:
            entry = await asyncio.to_thread(self.store.model, name)
        except SeqServeError:  # the model vanished or is broken: nothing resolves to it
            entry = None
        try:  # the default refused (`production` on a version that fails its digest, say):
            # the entry's aliases still keep the versions they name
            current = (
                None if entry is None else await asyncio.to_thread(self.rule.version_for, entry, "")
            )
        except SeqServeError:
            current = None
        outdated = entry is not None and self.rule.republished(entry, version, served.fingerprint)
        if not outdated and self.wanted(served, entry, current):  # outdated: nothing wants it
            return
        if served.sessions > 0 or served.unloading:
            return
        await self.unload(served)

    def wanted(self, served: ServedVersion, entry: ModelEntry | None, default: int | None) -> bool:
        """Whether new sessions may still ask for `served` though none runs on it: it is the
        model's `default` version (what "" resolves to now), an alias in `entry` points at it,
        or the preload setting names it. Such a version stays loaded (`release_if_unused` and
        the store watcher both ask here, so a poll never undoes what start-up loaded)."""
        key = (served.name, served.version)
        aliased = entry is not None and served.version in entry.aliases.values()
        return key in self._preloaded or aliased or default == served.version

    async def unload(self, served: ServedVersion) -> None:
        served.unloading = True
        self._served.pop((served.name, served.version), None)
        await served.scheduler.stop()
        served.pool.close()
        log.info("unloaded %s:%d", served.name, served.version)
        self._observer.on_unloaded(served)

    async def stop_schedulers(self) -> None:
        """Finish the step in flight everywhere and refuse more (shutdown, before spilling)."""
        for served in list(self._served.values()):
            await served.scheduler.stop()

    async def close(self) -> None:
        for served in list(self._served.values()):
            await self.unload(served)
        self._reader.shutdown(wait=False)  # no new session comes after the schedulers stopped
        if self._changes is not None:
            self._changes.close()


def spec_key(spec: str) -> str:
    """One spelling per meaning of a version spec, for `resolve`'s kept readings: the store
    reads a spec stripped, and digits as a number, so " 1", "01" and "1" are one entry, not
    three of the `KNOWN_SPECS` (a client cycling spellings would otherwise clear them all)."""
    spec = spec.strip()
    digits = version_digits(spec)
    return spec if digits is None else digits

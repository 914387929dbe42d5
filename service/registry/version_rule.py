"""The one rule for which version a new session gets, and whether a served version is still
intact: shared by `CreateSession`, `ListModels`/`GetModel` and the server's store watcher.

A version serves new sessions while its manifest is usable and its weights hash to the digest
the manifest records and fit the architecture it describes (what loading checks). Verdicts are
remembered per weights file while the file is unchanged, so asking again costs a stat, not a
hash.
"""

from __future__ import annotations

from service.errors import DigestMismatch, SeqServeError, VersionUnusable, WeightsMismatch
from service.registry.digests import DigestVerdicts
from service.registry.snapshot import ModelEntry
from service.registry.version_spec import LATEST, PRODUCTION


class VersionRule:
    def __init__(self) -> None:
        self._digests = DigestVerdicts()

    def version_for(self, entry: ModelEntry, spec: str) -> int:
        """The version a new session asking for `spec` gets: the one rule `CreateSession`,
        `ListModels` and `GetModel` share.

        As `entry.resolve(spec)`, except that when `spec` means the latest version ("latest", or
        "" without a `production` alias) a version whose weights fail their digest or do not fit
        its manifest is skipped, like one whose manifest is malformed, for the next older one.
        For "" with a `production` alias, the alias's version is checked the same way and
        refused (DigestMismatch / WeightsMismatch / VersionUnusable), never replaced by another:
        the alias is what was chosen. So the default version the registry reports (this, or 0
        when it raises) is the one a new session gets, or is refused on. Asked for by number or
        another alias, such a version is not checked here (loading it raises the same).
        Blocking: may read weights files, each once per change."""
        version = entry.resolve(spec)
        spec = spec.strip()
        if spec == "" and PRODUCTION in entry.aliases:
            self.check_weights(entry, version)
            return version
        if spec != LATEST and spec != "":
            return version
        candidates = [v for v in reversed(entry.usable_versions) if v <= version]
        for i, candidate in enumerate(candidates):
            try:
                self.check_weights(entry, candidate)
            except (DigestMismatch, WeightsMismatch):
                if i + 1 == len(candidates):
                    raise
                continue
            return candidate
        raise AssertionError("unreachable: the loop returns or raises")

    def servable_versions(self, entry: ModelEntry) -> tuple[int, ...]:
        """The versions a new session can be created on: a usable manifest and weights that
        pass `check_weights` (what `ListModels` lists; `GetModel` reports the others REFUSED
        with `refusal`). Blocking: reads weights files not read since they changed."""
        return tuple(v for v in entry.usable_versions if self.refusal(entry, v) is None)

    def refusal(self, entry: ModelEntry, version: int) -> str | None:
        """Why `version` takes no new sessions (a bad manifest, missing weights, weights that
        fail their digest or do not fit the manifest), or None. Paths in it are as the store's
        scan names them (absolute: `ModelStore.within` names them within the store)."""
        found = entry.entry(version)
        if found is None:
            return f"version {version} of {entry.name!r} is not in the store"
        if found.problem is not None:
            return found.problem
        try:
            self.check_weights(entry, version)
        except SeqServeError as exc:
            return exc.message
        return None

    def check_weights(self, entry: ModelEntry, version: int) -> None:
        """DigestMismatch / WeightsMismatch / VersionUnusable unless `version`'s weights are
        usable, hash to their manifest's digest and fit its architecture (read again only when
        the file changed)."""
        found = entry.usable(version)
        manifest = found.manifest
        assert manifest is not None
        weights = found.path / manifest.weights_file
        self._digests.check(weights, manifest.weights_sha256, manifest.to_config())

    def republished(self, entry: ModelEntry, version: int, fingerprint: str) -> bool:
        """Whether the store now holds `version` with a usable manifest that describes other
        weights than the copy loaded with `fingerprint` (the model deleted and published again
        under that number, say): the copy is outdated, the files on disk are what a new load
        reads. Not blocking: the manifest was read with the entry."""
        found = entry.entry(version)
        if found is None or found.problem is not None or found.manifest is None:
            return False
        return found.manifest.fingerprint() != fingerprint

    def check_unchanged(self, entry: ModelEntry, version: int, fingerprint: str) -> None:
        """Raise unless `version` is still in the store as it was loaded (with `fingerprint`):
        VersionUnusable when its folder, manifest or weights are gone or the manifest now
        describes other weights; DigestMismatch when the weights no longer match."""
        what = f"{entry.name}:{version}"
        found = entry.entry(version)
        if found is None:
            raise VersionUnusable(f"{what} is gone from the store; it takes no new sessions")
        if found.problem is not None or found.manifest is None:
            raise VersionUnusable(f"{what} is unusable on disk: {found.problem}")
        if found.manifest.fingerprint() != fingerprint:
            raise VersionUnusable(republished_reason(entry.name, version))
        # The digest alone: the fingerprint covers digest and architecture, and these bytes fit
        # that architecture when they were loaded (no parse per new session).
        weights = found.path / found.manifest.weights_file
        self._digests.check(weights, found.manifest.weights_sha256)


def republished_reason(name: str, version: int) -> str:
    """Why a loaded copy of `name:version` whose manifest on disk changed since (`republished`)
    takes no new sessions: the sessions made on it still run on it."""
    return (
        f"{name}:{version}: its manifest on disk changed since it was loaded; it takes no new "
        "sessions"
    )

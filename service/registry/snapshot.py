"""An immutable view of the model store as it was on disk at one moment, and name resolution.

`scan_store` reads only folder listings, `manifest.json` and `aliases.json` files: never weights.
That makes it cheap enough for the server to call every few seconds to notice new versions and
alias moves. A broken version or alias file is recorded with a message naming the file and what is
wrong with it; it never hides the rest of the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pydantic import ValidationError

from service.errors import (
    AliasNotFound,
    FailedPrecondition,
    ModelNotFound,
    VersionNotFound,
    VersionUnusable,
    quote,
)
from service.models.tokenizer import get_tokenizer
from service.registry.aliases import ALIASES_FILE, AliasFileError, read_aliases
from service.registry.manifest import MANIFEST_FILE, Manifest, TokensInput
from service.registry.parsed_files import ParsedFiles
from service.registry.version_spec import (
    LATEST,
    MAX_VERSION,
    PRODUCTION,
    VersionNumberTooLong,
    version_number,
)

# Canonical version folder names only, 1 to MAX_VERSION: "007" and "0" are not versions.
_VERSION_DIR_RE = re.compile(r"^[1-9][0-9]{0,8}$")


@dataclass(frozen=True)
class VersionEntry:
    version: int
    path: Path  # the version folder
    manifest: Manifest | None  # None when the manifest could not be used
    problem: str | None = None  # why this version is refused; None when it is usable

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def status(self) -> str:
        return "ok" if self.problem is None else self.problem

    @property
    def weights_path(self) -> Path | None:
        return None if self.manifest is None else self.path / self.manifest.weights_file


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path  # the model folder
    versions: tuple[VersionEntry, ...]  # ascending by version, usable or not
    aliases: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    aliases_problem: str | None = None  # aliases.json exists but is malformed

    def entry(self, version: int) -> VersionEntry | None:
        for v in self.versions:
            if v.version == version:
                return v
        return None

    @property
    def usable_versions(self) -> tuple[int, ...]:
        return tuple(v.version for v in self.versions if v.ok)

    @property
    def latest(self) -> int | None:
        """The highest usable version: a broken newest version never becomes `latest`."""
        usable = self.usable_versions
        return usable[-1] if usable else None

    @property
    def problems(self) -> tuple[str, ...]:
        found = [v.problem for v in self.versions if v.problem is not None]
        if self.aliases_problem is not None:
            found.append(self.aliases_problem)
        return tuple(found)

    def resolve(self, spec: str) -> int:
        """Resolve a version spec: "" → alias `production` if set, else latest; "latest";
        digits → that version; anything else → an alias.

        Raises VersionNotFound / AliasNotFound (NOT_FOUND) or VersionUnusable when the target
        is on disk but refused."""
        spec = spec.strip()
        try:
            number = version_number(spec)
        except VersionNumberTooLong as exc:  # no version has it: quoted, not echoed whole
            known = ", ".join(map(str, self.usable_versions)) or "none"
            raise VersionNotFound(
                f"version {quote(spec)} of {self.name!r} not found ({exc}); versions: {known}"
            ) from None
        if number is not None:
            return self.usable(number).version
        if spec == LATEST or (spec == "" and self._alias_map().get(PRODUCTION) is None):
            latest = self.latest
            if latest is None:
                detail = "; ".join(self.problems) or "the model folder has no versions"
                raise VersionNotFound(f"model {self.name!r} has no usable version: {detail}")
            return latest
        alias = spec or PRODUCTION
        aliases = self._alias_map()
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise AliasNotFound(
                f"alias {quote(alias)} of {self.name!r} not found; aliases: {known}"
            )
        return self.usable(aliases[alias], via_alias=alias).version

    def usable(self, version: int, via_alias: str | None = None) -> VersionEntry:
        """The entry of `version` (its manifest is set), or VersionNotFound / VersionUnusable."""
        entry = self.entry(version)
        if via_alias is None:
            what = f"version {version} of {self.name!r}"
            absent = f"{what} not found"
        else:
            what = f"alias {via_alias!r} of {self.name!r} points to version {version}"
            absent = f"{what}, which is not in the store"
        if entry is None:
            known = ", ".join(map(str, self.usable_versions)) or "none"
            raise VersionNotFound(f"{absent}; versions: {known}")
        if entry.problem is not None or entry.manifest is None:
            raise VersionUnusable(f"{what} is unusable: {entry.problem}")
        return entry

    def _alias_map(self) -> Mapping[str, int]:
        # Guessing without the alias file could silently serve a version nobody chose.
        if self.aliases_problem is not None:
            raise VersionUnusable(
                f"cannot resolve aliases of {self.name!r}: {self.aliases_problem}"
            )
        return self.aliases


@dataclass(frozen=True)
class StoreSnapshot:
    root: Path
    models: Mapping[str, ModelEntry]  # by name, read-only

    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            empty = f"none (the model store {self.root} is empty or missing)"
            known = ", ".join(sorted(self.models)) or empty
            raise ModelNotFound(f"model {quote(name)} not found; available: {known}")
        return entry

    def resolve(self, name: str, spec: str = "") -> int:
        return self.model(name).resolve(spec)

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(p for m in self.models.values() for p in m.problems)


def scan_store(root: Path) -> StoreSnapshot:
    """Read the whole store (manifests and aliases only). A missing root is an empty store."""
    models = {name: scan_model(root / name) for name in model_dir_names(root)}
    return StoreSnapshot(root=root, models=MappingProxyType(models))


def model_dir_names(root: Path) -> list[str]:
    """Model folder names under `root`, sorted; hidden entries (temp folders, locks) skipped.
    Raises FailedPrecondition when `root` is there but no folder that can be listed (a file,
    no permission): calling that an empty store would hide the mistake."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise FailedPrecondition(
            f"the model store {root} is not a readable folder: {exc.strerror or exc}"
        ) from exc


def scan_model(model_dir: Path) -> ModelEntry:
    versions = tuple(
        scan_version(model_dir.name, model_dir / d)
        for d in sorted(version_dir_names(model_dir), key=int)
    )
    try:
        aliases, aliases_problem = dict(_ALIASES.get(model_dir / ALIASES_FILE)), None
    except AliasFileError as exc:
        aliases, aliases_problem = {}, str(exc)
    return ModelEntry(
        name=model_dir.name,
        path=model_dir,
        versions=versions,
        aliases=MappingProxyType(aliases),
        aliases_problem=aliases_problem,
    )


def version_dir_names(model_dir: Path) -> list[str]:
    try:
        return [
            p.name for p in model_dir.iterdir() if _VERSION_DIR_RE.fullmatch(p.name) and p.is_dir()
        ]
    except FileNotFoundError:
        return []


def next_version(model_dir: Path, name: str) -> int:
    """The number a new version of `name` (in `model_dir`) takes: one past its highest folder,
    broken ones included. FailedPrecondition past MAX_VERSION: its folder would be no version's."""
    version = max(map(int, version_dir_names(model_dir)), default=0) + 1
    if version > MAX_VERSION:
        raise FailedPrecondition(
            f"could not publish {name!r}: it has version {MAX_VERSION}, the highest a model "
            "store holds; publish it under another name"
        )
    return version


def scan_version(name: str, version_dir: Path) -> VersionEntry:
    version = int(version_dir.name)
    try:
        manifest = _MANIFESTS.get(version_dir / MANIFEST_FILE)
    except ManifestError as exc:
        return VersionEntry(version, version_dir, None, str(exc))
    weights = version_dir / manifest.weights_file
    if not weights.is_file():
        return VersionEntry(version, version_dir, manifest, f"{weights}: missing")
    return VersionEntry(version, version_dir, manifest)


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the field."""


def read_manifest(version_dir: Path, *, name: str, version: int) -> Manifest:
    """Parse and check one manifest against the folder it sits in. Raises ManifestError."""
    path = version_dir / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable: {exc}") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path}: invalid manifest: {describe_validation_error(exc)}") from exc
    if manifest.name != name:
        raise ManifestError(
            f"{path}: field 'name' is {manifest.name!r}, but the folder is {name!r}"
        )
    if manifest.version != version:
        raise ManifestError(
            f"{path}: field 'version' is {manifest.version}, but the folder is {version}"
        )
    try:
        manifest.to_config()
        if isinstance(manifest.input, TokensInput):
            check_tokenizer(manifest.input.tokenizer, manifest.input.vocab_size)
    except (AssertionError, ValueError) as exc:  # ModelConfig asserts its invariants
        raise ManifestError(f"{path}: inconsistent manifest: {exc}") from exc
    return manifest


def check_tokenizer(name: str, vocab_size: int) -> None:
    """Raise ValueError unless tokenizer `name` exists and covers exactly `vocab_size` ids."""
    tokenizer = get_tokenizer(name)
    if tokenizer.vocab_size != vocab_size:
        # Every id the model can predict must decode, and every id the tokenizer emits must embed.
        raise ValueError(
            f"tokenizer {name!r} has {tokenizer.vocab_size} ids, the model's vocabulary "
            f"{vocab_size}"
        )


def describe_validation_error(exc: ValidationError) -> str:
    """One line per pydantic error: the field's dotted path and what is wrong with it."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def _read_manifest_file(path: Path) -> Manifest:
    version_dir = path.parent
    return read_manifest(version_dir, name=version_dir.parent.name, version=int(version_dir.name))


# What the scans read, kept while each file is unchanged (`parsed_files`): resolving the version of
# every new session against the store costs a stat per file, not a read and a validation.
_MANIFESTS: ParsedFiles[Manifest] = ParsedFiles(_read_manifest_file)
_ALIASES: ParsedFiles[dict[str, int]] = ParsedFiles(lambda path: read_aliases(path.parent))

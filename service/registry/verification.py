"""Re-verifying a store on disk: every version's weights against its manifest, and every alias
against what it points to (what `seqserve models verify` reports, before a server refuses)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.errors import SeqServeError
from service.registry.aliases import ALIASES_FILE
from service.registry.digests import read_verified
from service.registry.manifest import MANIFEST_FILE, Manifest
from service.registry.snapshot import StoreSnapshot
from service.registry.weights import check_tensors, deserialize


@dataclass(frozen=True)
class VerifyResult:
    name: str
    version: int
    path: Path  # the file at fault (or the weights file when ok)
    ok: bool
    message: str  # "ok", or what is wrong, naming the file


@dataclass(frozen=True)
class AliasProblem:
    name: str
    alias: str | None  # None: the aliases file itself
    version: int | None  # the version the alias points to
    path: Path  # the model's aliases.json
    message: str


def check_weights(path: Path, manifest: Manifest) -> None:
    """The weights at `path` hash to `manifest`'s digest and fit its architecture (what a load
    checks, without building the model); raises DigestMismatch / WeightsMismatch."""
    check_tensors(deserialize(read_verified(path, manifest.weights_sha256), str(path)),
                  manifest.to_config(), str(path))  # fmt: skip


def verify_versions(snapshot: StoreSnapshot) -> list[VerifyResult]:
    """Re-hash every version's weights and check its tensors; one result per version."""
    results = []
    for model in snapshot.models.values():
        for entry in model.versions:
            if entry.problem is not None or entry.manifest is None:
                path = entry.weights_path or entry.path / MANIFEST_FILE
                message = entry.problem or "unusable"
                results.append(VerifyResult(model.name, entry.version, path, False, message))
                continue
            path = entry.path / entry.manifest.weights_file
            try:
                check_weights(path, entry.manifest)
            except SeqServeError as exc:
                results.append(VerifyResult(model.name, entry.version, path, False, exc.message))
            else:
                results.append(VerifyResult(model.name, entry.version, path, True, "ok"))
    return results


def alias_problems(snapshot: StoreSnapshot, results: list[VerifyResult]) -> list[AliasProblem]:
    """Aliases that would refuse new sessions: a malformed `aliases.json`, or an alias pointing
    at a version that is missing or failed `results` (from `verify_versions`)."""
    good = {(r.name, r.version) for r in results if r.ok}
    problems = []
    for model in snapshot.models.values():
        path = model.path / ALIASES_FILE
        if model.aliases_problem is not None:
            problems.append(AliasProblem(model.name, None, None, path, model.aliases_problem))
            continue
        for alias, version in sorted(model.aliases.items()):
            if (model.name, version) not in good:
                what = "missing" if model.entry(version) is None else "refused"
                message = f"alias {alias!r} points to version {version}, which is {what}"
                problems.append(AliasProblem(model.name, alias, version, path, message))
    return problems

"""`VersionRule`: which version new sessions get, skipping a newest version that would not load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.errors import DigestMismatch, VersionUnusable, WeightsMismatch
from service.registry import digests
from service.registry.store import ModelStore
from service.registry.version_rule import VersionRule

from .conftest import PublishFn


def _set_hidden_size(store: ModelStore, version: int, hidden_size: int) -> Path:
    """Edit version `version`'s manifest: it still parses and its digest still matches the
    weights, but it describes another architecture than the tensors have."""
    path = store.root / "m" / str(version) / "manifest.json"
    body: dict[str, Any] = json.loads(path.read_text())
    body["hidden_size"] = hidden_size
    path.write_text(json.dumps(body))
    return path


@pytest.fixture
def misfit(store: ModelStore, publish: PublishFn) -> ModelStore:
    """Model `m`: version 1 whole; version 2's manifest says hidden_size 16, its tensors 8."""
    publish("m", seed=1)
    publish("m", seed=2)
    _set_hidden_size(store, 2, 16)
    return store


def test_latest_skips_a_newest_version_whose_tensors_do_not_fit_its_manifest(
    misfit: ModelStore,
) -> None:
    rule, entry = VersionRule(), misfit.model("m")
    assert entry.usable_versions == (1, 2)  # the scan reads manifests only: it cannot tell
    assert rule.version_for(entry, "") == 1
    assert rule.version_for(entry, "latest") == 1
    # Asked for by number, it is not skipped: it is refused, as loading it is.
    assert rule.version_for(entry, "2") == 2
    with pytest.raises(WeightsMismatch, match=r"rnn\.weight_hh_l0 has shape \[32, 8\]"):
        rule.check_weights(entry, 2)
    with pytest.raises(WeightsMismatch):
        misfit.load("m", 2)


def test_the_verdict_is_kept_until_the_manifest_describes_the_tensors_again(
    misfit: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real = digests.read_verified

    def counting(path: Path, expected: str) -> bytes:
        reads.append(path)
        return real(path, expected)

    monkeypatch.setattr(digests, "read_verified", counting)
    rule = VersionRule()
    for _ in range(3):
        assert rule.version_for(misfit.model("m"), "") == 1
    assert len(reads) == 2  # each weights file read once, not at every question
    _set_hidden_size(misfit, 2, 8)  # fixed: the manifest fits the tensors again
    assert rule.version_for(misfit.model("m"), "") == 2


def test_a_production_alias_on_a_version_that_would_not_load_is_refused_not_replaced(
    misfit: ModelStore, publish: PublishFn
) -> None:
    """An empty spec follows `production`: when its version's weights do not fit (or fail
    their digest, or are gone) "" is refused, as creating a session on it is, and no other
    version is served in its place. What the registry reports as the default is this rule's
    answer."""
    publish("m", seed=3)  # version 3, whole
    misfit.set_alias("m", "production", 1)
    (misfit.root / "m" / "aliases.json").write_text('{"production": 2}')  # by hand
    rule, entry = VersionRule(), misfit.model("m")
    with pytest.raises(WeightsMismatch, match=r"rnn\.weight_hh_l0 has shape \[32, 8\]"):
        rule.version_for(entry, "")
    assert rule.version_for(entry, "latest") == 3
    assert rule.version_for(entry, "production") == 2  # by name: loading refuses it
    weights = misfit.root / "m" / "1" / "weights.safetensors"
    (misfit.root / "m" / "aliases.json").write_text('{"production": 1}')
    assert rule.version_for(misfit.model("m"), "") == 1
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DigestMismatch, match="sha256 mismatch"):
        rule.version_for(misfit.model("m"), "")
    weights.unlink()
    with pytest.raises(VersionUnusable, match=r"1/weights\.safetensors: missing"):
        rule.version_for(misfit.model("m"), "")


def test_servable_versions_leave_out_what_would_not_load_with_the_reason(
    misfit: ModelStore, publish: PublishFn
) -> None:
    """Version 2's tensors do not fit its manifest, 3 fails its digest, 4's manifest is
    malformed: only 1 and 5 serve, and `refusal` says why each other one does not."""
    for seed in (3, 4, 5):
        publish("m", seed=seed)
    weights = misfit.root / "m" / "3" / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (misfit.root / "m" / "4" / "manifest.json").write_text("{not json")
    rule, entry = VersionRule(), misfit.model("m")
    assert entry.usable_versions == (1, 2, 3, 5)  # manifests only
    assert rule.servable_versions(entry) == (1, 5)
    reasons = {v: rule.refusal(entry, v) for v in range(1, 7)}
    assert reasons[1] is None and reasons[5] is None
    assert "rnn.weight_hh_l0 has shape [32, 8]" in str(reasons[2])
    assert "3/weights.safetensors: sha256 mismatch" in str(reasons[3])
    assert "4/manifest.json: unreadable" in str(reasons[4])
    assert reasons[6] == "version 6 of 'm' is not in the store"

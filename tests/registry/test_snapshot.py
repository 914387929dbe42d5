"""Scanning the store: broken versions are recorded with the file and field at fault and never
hide the rest; the snapshot is an immutable view that follows the disk."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from service.errors import FailedPrecondition
from service.registry.store import ModelStore

from .conftest import PublishFn, small_config


def _edit_manifest(store: ModelStore, name: str, version: int, edit) -> Path:
    path = store.root / name / str(version) / "manifest.json"
    body: dict[str, Any] = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body))
    return path


def _break_unknown_field(body: dict[str, Any]) -> None:
    body["learning_rate"] = 0.1


def _break_type(body: dict[str, Any]) -> None:
    body["hidden_size"] = "big"


def _break_nested(body: dict[str, Any]) -> None:
    body["input"]["vocab_size"] = -1


@pytest.mark.parametrize(
    ("edit", "field", "why"),
    [
        (_break_unknown_field, "learning_rate", "Extra inputs are not permitted"),
        (_break_type, "hidden_size", "valid integer"),
        (_break_nested, "input.tokens.vocab_size", "greater than 0"),
    ],
    ids=["unknown-field", "bad-type", "nested-bad-value"],
)
def test_malformed_manifest_is_skipped_naming_file_and_field(
    store: ModelStore, publish: PublishFn, edit, field: str, why: str
) -> None:
    publish("m")
    publish("m")
    publish("other")
    path = _edit_manifest(store, "m", 2, edit)

    snap = store.snapshot()
    model = snap.model("m")
    broken = model.entry(2)
    assert broken is not None and not broken.ok and broken.manifest is None
    assert str(path) in broken.status
    assert f"field '{field}'" in broken.status
    assert why in broken.status
    # The rest of the store stays usable; `latest` skips the refused version.
    assert model.usable_versions == (1,)
    assert model.latest == 1
    assert snap.model("other").latest == 1
    assert store.load("m", 1).manifest.version == 1
    assert snap.problems == (broken.status,)


def test_manifest_must_match_its_folder(store: ModelStore, publish: PublishFn) -> None:
    publish("m")
    publish("m")
    path = _edit_manifest(store, "m", 2, lambda b: b.update(version=1))
    entry = store.model("m").entry(2)
    assert entry is not None
    assert entry.problem == f"{path}: field 'version' is 1, but the folder is 2"

    _edit_manifest(store, "m", 2, lambda b: b.update(version=2, name="n"))
    entry = store.model("m").entry(2)
    assert entry is not None
    assert entry.problem == f"{path}: field 'name' is 'n', but the folder is 'm'"


def test_manifest_that_is_not_json_is_refused(store: ModelStore, publish: PublishFn) -> None:
    publish("m")
    path = store.root / "m" / "1" / "manifest.json"
    path.write_text("{not json")
    entry = store.model("m").entry(1)
    assert entry is not None and entry.problem is not None
    assert entry.problem.startswith(f"{path}: unreadable:")


def test_inconsistent_architecture_is_refused(store: ModelStore, publish: PublishFn) -> None:
    publish("f", small_config("gru", "features"))
    path = _edit_manifest(store, "f", 1, lambda b: b.update(head={"kind": "classification"}))
    entry = store.model("f").entry(1)
    assert entry is not None and entry.problem is not None
    assert entry.problem.startswith(f"{path}: inconsistent manifest:")
    assert "classification head needs token input" in entry.problem


def test_weights_file_cannot_point_outside_the_version_folder(
    store: ModelStore, publish: PublishFn
) -> None:
    publish("m")
    _edit_manifest(store, "m", 1, lambda b: b.update(weights_file="../../other/1/weights"))
    entry = store.model("m").entry(1)
    assert entry is not None and entry.problem is not None
    assert "field 'weights_file'" in entry.problem


def test_scan_ignores_temp_and_non_version_folders(store: ModelStore, publish: PublishFn) -> None:
    publish("m")
    (store.root / "m" / ".publish-123-abcd").mkdir()
    (store.root / "m" / "007").mkdir()
    (store.root / "m" / "notes").mkdir()
    (store.root / "m" / "2\n").mkdir()  # `^...$` with `re.match` read it as version 2
    (store.root / ".trash").mkdir()
    snap = store.snapshot()
    assert list(snap.models) == ["m"]
    assert [v.version for v in snap.model("m").versions] == [1]


def test_missing_root_is_an_empty_store(tmp_path: Path) -> None:
    snap = ModelStore(tmp_path / "nowhere").snapshot()
    assert dict(snap.models) == {}
    assert snap.problems == ()


def test_a_root_that_is_a_file_is_refused_not_an_empty_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.write_text("not a folder")
    want = f"the model store {root} is not a readable folder: Not a directory"
    with pytest.raises(FailedPrecondition, match=re.escape(want)):
        ModelStore(root).snapshot()
    with pytest.raises(FailedPrecondition, match=re.escape(want)):
        ModelStore(root).model("m")


def test_snapshot_is_immutable_and_follows_the_disk(store: ModelStore, publish: PublishFn) -> None:
    publish("m")
    before = store.snapshot()
    with pytest.raises(TypeError):
        before.models["x"] = before.models["m"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.model("m").versions = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        before.model("m").aliases["production"] = 1  # type: ignore[index]

    publish("m")
    store.set_alias("m", "production", 1)
    publish("n")
    after = store.snapshot()
    # The old view is untouched; the new one sees the new version, alias and model.
    assert before.model("m").usable_versions == (1,)
    assert dict(before.model("m").aliases) == {}
    assert after.model("m").usable_versions == (1, 2)
    assert dict(after.model("m").aliases) == {"production": 1}
    assert sorted(after.models) == ["m", "n"]

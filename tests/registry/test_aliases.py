"""Setting and deleting aliases: validated names, existing versions, atomic aliases.json."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from service.errors import (
    AliasNotFound,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    VersionNotFound,
)
from service.registry.store import ModelStore

from .conftest import PublishFn


@pytest.fixture
def model(store: ModelStore, publish: PublishFn) -> ModelStore:
    publish("m")
    publish("m")
    return store


def _on_disk(store: ModelStore) -> dict[str, int]:
    return json.loads((store.root / "m" / "aliases.json").read_text())


def test_set_move_and_delete(model: ModelStore) -> None:
    model.set_alias("m", "production", 1)
    model.set_alias("m", "staging", 2)
    assert _on_disk(model) == {"production": 1, "staging": 2}
    model.set_alias("m", "production", 2)
    assert _on_disk(model) == {"production": 2, "staging": 2}
    model.delete_alias("m", "staging")
    assert _on_disk(model) == {"production": 2}
    assert dict(model.model("m").aliases) == {"production": 2}
    # Only the aliases file and its lock appear beside the versions: no temp files left.
    names = sorted(p.name for p in (model.root / "m").iterdir())
    assert names == [".aliases.lock", "1", "2", "aliases.json"]


@pytest.mark.parametrize("alias", ["latest", "3", "", "Prod", "has space", "a/b", "prod\n"])
def test_invalid_alias_names_are_refused(model: ModelStore, alias: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(repr(alias))):
        model.set_alias("m", alias, 1)
    assert not (model.root / "m" / "aliases.json").exists()
    # Deleting one is the same bad argument, not "not found" (no alias can have the name).
    model.set_alias("m", "production", 1)
    with pytest.raises(InvalidArgument, match=re.escape(repr(alias))):
        model.delete_alias("m", alias)
    assert _on_disk(model) == {"production": 1}


def test_alias_must_point_at_an_existing_version(model: ModelStore) -> None:
    with pytest.raises(VersionNotFound, match=r"version 5 of 'm' not found; versions: 1, 2"):
        model.set_alias("m", "production", 5)
    with pytest.raises(ModelNotFound):
        model.set_alias("nope", "production", 1)


@pytest.mark.parametrize("damage", ["a flipped byte", "not safetensors"])
def test_alias_must_point_at_weights_that_pass_their_digest(model: ModelStore, damage: str) -> None:
    """An alias is what new sessions get: moved to weights that fail, it would refuse them
    all (it was accepted: `models verify` said BAD, the alias moved, every default
    CreateSession failed DATA_LOSS)."""
    model.set_alias("m", "production", 1)
    weights = model.root / "m" / "2" / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if damage == "a flipped byte"
                        else b"PK\x03\x04 not safetensors")  # fmt: skip
    with pytest.raises(FailedPrecondition, match=r"version 2 of 'm' cannot be aliased: ") as info:
        model.set_alias("m", "production", 2)
    assert info.value.reason == "VERSION_UNAVAILABLE", info.value.reason
    assert _on_disk(model) == {"production": 1}  # unchanged


def test_delete_unknown_alias_names_the_existing_ones(model: ModelStore) -> None:
    model.set_alias("m", "production", 1)
    with pytest.raises(AliasNotFound) as info:
        model.delete_alias("m", "canary")
    assert info.value.message == "alias 'canary' of 'm' not found; aliases: production"
    assert _on_disk(model) == {"production": 1}


@pytest.mark.parametrize(
    "body",
    [
        '{"production": true}',
        # Past the highest version folder (999,999,999), past int64, past int()'s 4,300 digits:
        # copied into the registry's int64 map it raised (ListModels INTERNAL, the store's
        # other models included; an alias write applied, then answered INTERNAL).
        '{"production": 1000000000}',
        '{"production": 1, "staging": 99999999999999999999}',
        '{"production": ' + "9" * 5000 + "}",
    ],
    ids=["a bool", "past the folders", "past int64", "5,000 digits"],
)
def test_a_malformed_aliases_file_is_not_overwritten(model: ModelStore, body: str) -> None:
    path = model.root / "m" / "aliases.json"
    path.write_text(body)
    with pytest.raises(FailedPrecondition, match=re.escape(f"{path}: ")) as info:
        model.set_alias("m", "canary", 1)
    assert len(info.value.message) < 400, "the number is not echoed"
    with pytest.raises(FailedPrecondition, match="fix or remove it"):
        model.delete_alias("m", "production")
    assert path.read_text() == body
    assert model.model("m").aliases_problem is not None  # the rest of the model still reads


def _refuse_writes(
    monkeypatch: pytest.MonkeyPatch, under: Path, code: int, modes: str = "wax"
) -> None:
    """Files under `under` open for reading only; opening one to write raises OSError(`code`),
    as on a read-only mount (EROFS) or a full disk (ENOSPC). A test cannot mount a read-only
    filesystem, so the refusal is simulated where the store opens its files."""
    real = Path.open

    def refusing_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.is_relative_to(under) and any(m in mode for m in modes):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)


def test_a_read_only_store_refuses_alias_changes_as_a_failed_precondition(
    model: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model.set_alias("m", "production", 1)
    _refuse_writes(monkeypatch, model.root, errno.EROFS)
    want = "cannot change the aliases of 'm': the model store cannot be written (Read-only"
    with pytest.raises(FailedPrecondition, match=re.escape(want)) as info:
        model.set_alias("m", "staging", 2)
    assert str(model.root) not in info.value.message  # clients never see the server's paths
    with pytest.raises(FailedPrecondition, match=re.escape(want)):
        model.delete_alias("m", "production")
    assert _on_disk(model) == {"production": 1}


def test_a_failed_aliases_write_is_a_failed_precondition(
    model: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model.set_alias("m", "production", 1)
    _refuse_writes(monkeypatch, model.root, errno.ENOSPC, modes="x")  # the lock still opens
    with pytest.raises(FailedPrecondition, match="cannot be written \\(No space left"):
        model.set_alias("m", "production", 2)
    assert _on_disk(model) == {"production": 1}
    assert not [p for p in (model.root / "m").iterdir() if p.name.endswith(".tmp")]

"""Resolving (model, spec) to a version, and every not-found message."""

from __future__ import annotations

import re

import grpc
import pytest

from service.errors import AliasNotFound, ModelNotFound, VersionNotFound, VersionUnusable
from service.registry.store import ModelStore

from .conftest import PublishFn


@pytest.fixture
def two_models(store: ModelStore, publish: PublishFn) -> ModelStore:
    for seed in range(3):
        publish("x", seed=seed)
    publish("bytes-lstm")
    return store


def test_empty_spec_is_latest_without_production(two_models: ModelStore) -> None:
    assert two_models.resolve("x", "") == 3
    assert two_models.resolve("x") == 3


def test_empty_spec_is_production_when_set(two_models: ModelStore) -> None:
    two_models.set_alias("x", "production", 2)
    assert two_models.resolve("x", "") == 2
    assert two_models.resolve("x", "latest") == 3


def test_numbers_and_aliases(two_models: ModelStore) -> None:
    two_models.set_alias("x", "staging", 1)
    assert two_models.resolve("x", "2") == 2
    assert two_models.resolve("x", "staging") == 1
    assert two_models.resolve("x", " staging ") == 1


def test_latest_skips_a_refused_newest_version(two_models: ModelStore) -> None:
    (two_models.root / "x" / "3" / "manifest.json").write_text("[]")
    assert two_models.resolve("x", "") == 2
    with pytest.raises(VersionUnusable, match=r"version 3 of 'x' is unusable: .*manifest\.json"):
        two_models.resolve("x", "3")


def test_unknown_model(two_models: ModelStore) -> None:
    with pytest.raises(ModelNotFound) as info:
        two_models.resolve("foo", "")
    assert info.value.message == "model 'foo' not found; available: bytes-lstm, x"
    assert info.value.status == grpc.StatusCode.NOT_FOUND


def test_unknown_model_in_an_empty_store(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match=r"model 'foo' not found; available: none"):
        store.resolve("foo", "")


def test_unknown_version(two_models: ModelStore) -> None:
    with pytest.raises(VersionNotFound) as info:
        two_models.resolve("x", "9")
    assert info.value.message == "version 9 of 'x' not found; versions: 1, 2, 3"


def test_unknown_alias(two_models: ModelStore) -> None:
    two_models.set_alias("x", "production", 1)
    with pytest.raises(AliasNotFound) as info:
        two_models.resolve("x", "canary")
    assert info.value.message == "alias 'canary' of 'x' not found; aliases: production"
    with pytest.raises(AliasNotFound, match="aliases: none"):
        two_models.resolve("bytes-lstm", "canary")


def test_alias_to_a_version_that_is_gone(two_models: ModelStore) -> None:
    (two_models.root / "x" / "aliases.json").write_text('{"production": 7}')
    with pytest.raises(VersionNotFound) as info:
        two_models.resolve("x", "")
    assert info.value.message == (
        "alias 'production' of 'x' points to version 7, which is not in the store; "
        "versions: 1, 2, 3"
    )


def test_model_with_no_usable_version(store: ModelStore) -> None:
    (store.root / "empty" / "1").mkdir(parents=True)
    with pytest.raises(VersionNotFound, match=r"model 'empty' has no usable version: .*missing"):
        store.resolve("empty", "")


def test_malformed_aliases_file_blocks_alias_resolution_only(two_models: ModelStore) -> None:
    path = two_models.root / "x" / "aliases.json"
    path.write_text('{"production": "two"}')
    # Guessing "latest" here could serve a version nobody chose; numbers still work.
    with pytest.raises(VersionUnusable, match=re.escape(f"{path}: alias 'production'")):
        two_models.resolve("x", "")
    assert two_models.resolve("x", "1") == 1
    assert two_models.resolve("x", "latest") == 3
    assert two_models.snapshot().model("x").aliases_problem is not None

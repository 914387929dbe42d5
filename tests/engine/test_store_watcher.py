"""The store watcher's polls: what they keep loaded and what they unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.errors import WeightsMismatch
from service.registry.store import ModelStore

from .conftest import TOK, EngineFactory, publish


async def test_poll_keeps_aliased_and_preloaded_versions_loaded(
    make_engine: EngineFactory, store_root: Path
) -> None:
    store = ModelStore(store_root)
    for seed in (2, 3, 4):
        publish(store, "tok", TOK, seed=seed)  # versions 2, 3 and 4
    store.set_alias("tok", "production", 1)  # the default version
    store.set_alias("tok", "staging", 2)
    engine = await make_engine()
    await engine.versions.preload(["tok:3"])  # as the server does before it reports ready
    loaded = {v.version for v in engine.versions.served() if v.name == "tok"}
    assert loaded == {1, 2, 3}
    await engine.versions.get("tok", 4)  # loaded, yet nothing asks for it
    await engine.watcher.poll()
    await engine.watcher.poll()
    for version in (1, 2, 3):
        assert engine.versions.find("tok", version) is not None, f"tok:{version} unloaded"
    assert engine.versions.find("tok", 4) is None


async def test_new_sessions_and_the_poll_skip_a_newest_version_that_would_not_load(
    make_engine: EngineFactory, store_root: Path
) -> None:
    """Version 2's manifest parses and its digest matches, but it describes another
    architecture than its tensors: "" means version 1 for the poll and for a new session, as
    it would for a digest failure."""
    publish(ModelStore(store_root), "tok", TOK, seed=2)
    manifest = store_root / "tok" / "2" / "manifest.json"
    body = json.loads(manifest.read_text())
    body["hidden_size"] = TOK.hidden_size * 2
    manifest.write_text(json.dumps(body))
    engine = await make_engine()
    await engine.watcher.poll()
    assert engine.versions.find("tok", 2) is None  # not warmed: it cannot load
    session, _ = await engine.create_session("tok")
    assert session.version == 1
    with pytest.raises(WeightsMismatch, match="tensors do not match the model"):
        await engine.create_session("tok", "2")

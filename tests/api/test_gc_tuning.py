"""`serve` keeps the cyclic GC off the hot path: the heap is frozen after start-up and after each
model load, and young collections are spaced out (see SeqServeServer.tune_gc)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.registry.store import ModelStore

from .conftest import TOKEN_CONFIG, publish_random


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_tune_gc_freezes_the_heap_and_spaces_young_collections(
    server: SeqServeServer, restore_gc: None
) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    server.tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == server.settings.server.gc_gen0_threshold


def _publish_v2(store_root: Path) -> None:
    """A second version of `tok`, published after start-up: not preloaded, its first session
    loads it."""
    publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=9)


async def test_loading_a_model_freezes_its_objects_too(
    server: SeqServeServer, client: SeqServeClient, store_root: Path, restore_gc: None
) -> None:
    server.tune_gc()
    _publish_v2(store_root)
    gc.unfreeze()
    await client.create_session("tok", "2")  # the first session loads the version
    assert server.engine.versions.find("tok", 2) is not None
    assert gc.get_freeze_count() > 0


async def test_an_embedded_server_leaves_gc_alone_on_load(
    server: SeqServeServer, client: SeqServeClient, store_root: Path, restore_gc: None
) -> None:
    _publish_v2(store_root)
    gc.unfreeze()
    await client.create_session("tok", "2")
    assert server.engine.versions.find("tok", 2) is not None
    assert gc.get_freeze_count() == 0


async def test_zero_threshold_leaves_gc_alone(server: SeqServeServer, restore_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    server.settings = server.settings.model_copy(
        update={"server": server.settings.server.model_copy(update={"gc_gen0_threshold": 0})}
    )
    server.tune_gc()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before

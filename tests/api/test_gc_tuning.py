"""`serve` keeps the cyclic GC off the hot path: the heap is frozen after start-up and after each
model load, so is whatever survives a collection, young collections are spaced out, and a
periodic thaw frees cycles that died frozen (see SeqServeServer.tune_gc, HeapFreezer)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy.exposition import Exposition

from service.api.gc_tuning import HeapFreezer
from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.registry.store import ModelStore
from tests.polling import until

from .conftest import TOKEN_CONFIG, ServerFactory, publish_random


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold, callbacks, enabled = gc.get_threshold(), list(gc.callbacks), gc.isenabled()
    gc.collect()  # what earlier tests left dead goes now, not into these tests' counts
    try:
        yield
    finally:
        gc.callbacks[:] = callbacks
        gc.unfreeze()
        gc.set_threshold(*threshold)
        (gc.enable if enabled else gc.disable)()


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


Ref = weakref.ref[_Node]


def _cycle() -> tuple[_Node, Ref]:
    """Two objects that refer to each other: only the cycle collector frees them."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


def _tracked(count: int) -> list[dict[str, list[int]]]:
    return [{"i": [i]} for i in range(count)]


def _in_sight(objects: list[dict[str, list[int]]]) -> int:
    """How many of `objects` the collector still walks (any generation, not frozen)."""
    ids = {id(o) for o in objects}
    return sum(1 for o in gc.get_objects() if id(o) in ids)


def test_without_the_hook_survivors_stay_in_sight(restore_gc: None) -> None:
    gc.disable()  # no automatic collection between the steps below
    kept = _tracked(2000)
    gc.collect(0)
    assert _in_sight(kept) == len(kept)  # in the middle generation now, walked again later


def test_what_survives_a_collection_is_frozen_and_older_generations_stay_empty(
    restore_gc: None,
) -> None:
    gc.disable()
    HeapFreezer().install()
    kept = _tracked(2000)
    frozen = gc.get_freeze_count()
    gc.collect(0)
    assert _in_sight(kept) == 0
    assert gc.get_freeze_count() >= frozen + len(kept)
    assert gc.get_objects(generation=1) == [] and gc.get_objects(generation=2) == []


def test_a_cycle_that_dies_frozen_waits_for_the_thaw(restore_gc: None) -> None:
    gc.disable()
    freezer = HeapFreezer()
    freezer.install()
    a, alive = _cycle()
    gc.collect(0)  # alive at the collection: frozen
    del a
    gc.collect()
    assert alive() is not None  # garbage, but out of the collector's sight
    assert freezer.thaw() >= 2
    assert alive() is None


def test_the_thaw_counts_only_what_died_frozen(restore_gc: None) -> None:
    gc.disable()
    freezer = HeapFreezer()
    freezer.install()
    young = [_cycle()[1] for _ in range(1000)]  # garbage at once, never frozen
    a, frozen = _cycle()
    gc.collect(0)  # `a` frozen; the young garbage collected
    young += [_cycle()[1] for _ in range(1000)]  # young garbage again, this time at the thaw
    del a
    assert 2 <= freezer.thaw() < 1000  # the frozen cycle, not the young garbage
    assert frozen() is None and not any(ref() for ref in young)


def test_a_quiet_second_gets_a_young_collection(restore_gc: None) -> None:
    """Traffic that replaces what it keeps leaves CPython's count flat (freeing a frozen object
    counts as a deallocation): the young generation fills, uncollected. `collect_young` bounds
    it to what was made since the last collection."""
    gc.disable()
    freezer = HeapFreezer()
    assert not freezer.collect_young(0)  # not installed: leaves the collector alone
    freezer.install()
    kept = _tracked(2000)
    gc.collect(0)  # frozen
    before = gc.get_count()[0]
    kept = _tracked(2000)  # each replaces one frozen and freed
    assert gc.get_count()[0] - before < len(kept)  # 4,000 made: the count barely moved
    assert _in_sight(kept) == len(kept)
    assert not freezer.collect_young(60)  # a collection ended less than a minute ago
    assert _in_sight(kept) == len(kept)
    assert freezer.collect_young(0)
    assert _in_sight(kept) == 0


def test_a_thaw_during_another_collection_says_so(restore_gc: None) -> None:
    """`gc.collect` does nothing while a collection is under way (on another thread, or here
    from inside one): the thaw reports None, not "nothing found"."""
    gc.disable()
    freezer = HeapFreezer()
    seen: list[int | None] = []

    def during(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and not seen:
            seen.append(freezer.thaw())

    gc.callbacks.append(during)
    gc.collect(0)
    gc.callbacks.remove(during)
    assert seen == [None]
    freezer.install()
    a, alive = _cycle()
    gc.collect(0)  # frozen while alive
    del a
    assert freezer.thaw() >= 2 and alive() is None  # outside a collection it runs


def test_collections_are_timed_by_generation(restore_gc: None) -> None:
    gc.disable()
    freezer = HeapFreezer()
    gc.collect(0)
    assert freezer.drain() == []  # not installed: nothing timed
    freezer.install()
    freezer.install()  # once only
    gc.collect(0)
    gc.collect(1)
    gc.collect(2)
    pauses = freezer.drain()
    assert [g for g, _ in pauses] == [0, 1, 2]
    assert all(0 <= seconds < 10 for _, seconds in pauses)
    assert freezer.drain() == []
    freezer.uninstall()
    assert not freezer.installed
    gc.collect(0)
    assert freezer.drain() == []


def test_a_thaw_is_timed_as_one_full_collection(restore_gc: None) -> None:
    """A thaw collects twice (what was never frozen, then everything): one pause of both,
    generation 2, not two (the first near zero, halving the exported median)."""
    gc.disable()
    freezer = HeapFreezer()
    freezer.install()
    freezer.drain()
    assert freezer.thaw() is not None
    pauses = freezer.drain()
    assert [g for g, _ in pauses] == [2], pauses
    gc.collect(2)  # a full collection outside a thaw is timed on its own again
    assert [g for g, _ in freezer.drain()] == [2]


async def _tuned(server_factory: ServerFactory, thaw_seconds: float) -> tuple[SeqServeServer, Ref]:
    """A server with serve's GC tuning, and a cycle frozen while alive, then dropped."""
    server = await server_factory(server={"gc_thaw_seconds": thaw_seconds})
    server.tune_gc()
    a, alive = _cycle()
    gc.collect(0)  # frozen while alive
    del a
    return server, alive


def _exported(server: SeqServeServer) -> Exposition:
    server.refresh_gauges()  # drains the timed collections into the histogram
    return Exposition.parse(server.metrics.render())


async def test_serve_thaws_the_heap_on_its_period_and_exports_the_collections(
    server_factory: ServerFactory, restore_gc: None
) -> None:
    server, alive = await _tuned(server_factory, thaw_seconds=0.05)
    await until(  # freed by a thaw, not by any young collection
        lambda: alive() is None, 10, "a thaw to free the frozen cycle", interval=0.02
    )
    exported = _exported(server)
    assert exported.total("seqserve_gc_pause_seconds_count", generation="0") >= 1
    assert exported.total("seqserve_gc_pause_seconds_count", generation="2") >= 1  # the thaws
    assert exported.total("seqserve_gc_thawed_garbage_objects_total") >= 2
    await server.stop()
    assert not any(getattr(cb, "__self__", None) is server._heap for cb in gc.callbacks)


async def test_the_thaw_task_retries_a_skipped_thaw_and_outlives_a_failed_one(
    server_factory: ServerFactory, restore_gc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes: list[int | Exception | None] = [None, RuntimeError("no"), 7]

    def thaw() -> int | None:
        outcome = outcomes.pop(0) if outcomes else 0
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    server = await server_factory(server={"gc_thaw_seconds": 0.05})
    monkeypatch.setattr(server._heap, "thaw", thaw)
    server.tune_gc()
    await until(
        lambda: _exported(server).total("seqserve_gc_thawed_garbage_objects_total") >= 7,
        10,
        "the third thaw's 7 objects to be exported",
        interval=0.02,
        detail=lambda: f"outcomes left: {outcomes}",
    )
    assert not outcomes
    await asyncio.wait_for(server.stop(), 30)  # the failed thaw did not end the task


async def test_serve_runs_a_young_collection_every_quiet_second(
    server_factory: ServerFactory, restore_gc: None
) -> None:
    server = await server_factory(server={"gc_thaw_seconds": 0})
    server.tune_gc()
    gc.disable()  # no collection of CPython's own: only the server's once-a-second one
    kept = _tracked(2000)
    await until(lambda: not _in_sight(kept), 10, "a young collection to freeze them", interval=0.05)


async def test_no_thaw_when_its_period_is_zero(
    server_factory: ServerFactory, restore_gc: None
) -> None:
    server, alive = await _tuned(server_factory, thaw_seconds=0)
    await asyncio.sleep(0.3)
    assert alive() is not None  # frozen, and nothing thaws it
    assert _exported(server).total("seqserve_gc_thawed_garbage_objects_total") == 0


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
    server._heap.uninstall()  # else any collection during the load would freeze things too
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
    callbacks = list(gc.callbacks)
    server.tune_gc()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
    assert gc.callbacks == callbacks  # no hook

"""Keeping Python's cyclic GC off the serving hot path (for `seqserve serve`).

Two measured stalls, and a third kept from building up:

- Full collections scanned every object torch and the loaded models had made: at 64 streaming
  sessions p99 step latency was ~170 ms against ~20 ms with `freeze_heap` (benchmarks). After
  start-up, and again after each model load, what exists is moved out of the collector's sight
  (`gc.freeze`) and young collections run less often.
- A server that keeps creating sessions keeps objects: 5 tracked objects a session (7 before
  predictions held tuples), which reached the middle generation 20 young collections later.
  Collecting it walked all of them: 375–513 ms with the event loop stopped, once every
  ~140,000 sessions created (in-process, docs/per-core-passes.md, "Eighteenth pass"). `HeapFreezer`
  freezes whatever survives any collection, so each collection walks only what was made since the
  one before and is still alive.
- CPython starts a young collection when allocations minus deallocations pass the threshold,
  and freeing a frozen object counts as a deallocation. Traffic that replaces what it keeps
  (each feed replaces its session's kept reply) leaves that count flat: the young generation
  would fill with every session's newest reply, uncollected, until one collection walked them
  all (a synthetic 100,000 sessions fed three times each: 300,001 objects young and no
  collection; collecting them then took 10 ms, more for the server's larger replies). So a
  young collection also runs once a second when none ran in that second (`collect_young`),
  walking that second's survivors only.

Frozen objects freed by their reference count are freed at once, as before; what seqserve makes
per session and per request is acyclic (tests/api/test_reference_cycles.py: every request path,
succeeding, cancelled or refused, with the collector off, leaves no cycle but grpc's dispatch
closure, garbage at once; answered errors drop their tracebacks, `error_status`). A reference
cycle that was alive at a collection and dies later waits for the next thaw: every
`gc_thaw_seconds` the heap is thawed and collected whole, once, and what that finds is counted
(`seqserve_gc_thawed_garbage_objects_total`).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from typing import Any

from service.api.metrics_observer import MetricsObserver
from service.engine.served_version import ServedVersion
from service.metrics.prometheus_metrics import Metrics

_PAUSES_KEPT = 4096  # between two drains (one a second): more collections than that is a bug


class ServerObserver(MetricsObserver):
    """Metrics, plus re-freezing the heap once a model version's objects exist."""

    def __init__(self, metrics: Metrics, gc_gen0_threshold: int) -> None:
        super().__init__(metrics)
        self._gc_gen0_threshold = gc_gen0_threshold
        self.tuning_gc = False  # set by SeqServeServer.tune_gc

    def on_loaded(self, served: ServedVersion) -> None:
        super().on_loaded(served)
        if self.tuning_gc:
            freeze_heap(self._gc_gen0_threshold)


def freeze_heap(gen0_threshold: int) -> None:
    """Keep the cyclic GC off the hot path. Full collections scanned every object torch and
    the loaded models had made, stalling the event loop: at 64 streaming sessions p99 step
    latency was ~170 ms against ~20 ms with this (benchmarks). Long-lived objects are moved
    out of the collector's sight and young collections run less often."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, max(gen1, 20), max(gen2, 100))


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


class HeapFreezer:
    """Freezes what survives each collection (a `gc.callbacks` hook) and times every
    collection. `thaw()` collects the whole heap once. Process-wide: one per `serve`."""

    def __init__(self) -> None:
        self._began = 0.0
        self._ended = time.monotonic()  # the last collection's end
        # (generation, seconds), appended by the hook on whichever thread collected; read on
        # the event loop by `drain`. Nothing here takes a lock: the hook cannot wait on one
        # the interrupted code may hold.
        self._pauses: deque[tuple[int, float]] = deque(maxlen=_PAUSES_KEPT)
        # While `thaw` runs: its thread, and the time its collections took so far (one pause:
        # timed apart, its first, of what was never frozen, read as a second full collection
        # of near zero, halving the generation-2 median and doubling its rate).
        self._thawing: int | None = None
        self._thaw_seconds = 0.0

    @property
    def installed(self) -> bool:
        return self._on_collection in gc.callbacks

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        while self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector (no collection can start meanwhile, so a start and its
        # stop are never interleaved with another's). `gc.freeze` splices lists: O(1).
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        if self._thawing == threading.get_ident():
            self._thaw_seconds += took
        else:
            self._pauses.append((info["generation"], took))
        self._ended = time.monotonic()
        gc.freeze()

    def collect_young(self, quiet_seconds: float) -> bool:
        """A young collection, when none has ended for `quiet_seconds`: what survived the last
        one's is frozen, so this walks only what was made since and is still alive. → whether
        it ran."""
        if not self.installed or time.monotonic() - self._ended < quiet_seconds:
            return False
        gc.collect(0)
        return True

    def thaw(self) -> int | None:
        """Collect the whole heap, frozen part included, then freeze what survived. Returns
        the unreachable objects found (cycles that died after being frozen), or None when a
        collection on another thread was under way (`gc.collect` then does nothing: try
        again later). Stops the calling thread for as long as a full collection of
        everything alive takes."""
        self._thawing, self._thaw_seconds = threading.get_ident(), 0.0
        try:
            full = _full_collections()
            gc.collect()  # what was never frozen first: young garbage is not what a thaw is for
            if _full_collections() == full:
                return None  # nothing ran, nothing was touched
            full = _full_collections()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()  # also when the hook is not installed
            return found if _full_collections() > full else None
        finally:
            self._thawing = None
            if self._thaw_seconds:  # one generation-2 pause, both collections
                self._pauses.append((2, self._thaw_seconds))

    def drain(self) -> list[tuple[int, float]]:
        """The collections timed since the last drain: (generation, seconds) each."""
        out = []
        while self._pauses:
            out.append(self._pauses.popleft())
        return out

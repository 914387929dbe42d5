"""After a batched step: journal it (or put its rows back when it cannot be made durable),
hand each row its result, report the step's stats. The step scheduler decides what steps and
when; this decides what a finished step means for its rows."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.generation import Generation
from service.engine.row_group import Commit, RowGroup, RowOwner
from service.errors import SessionMoved, Unavailable
from service.metrics.stats import StepStats
from service.runtime.runner import ModelRunner
from service.runtime.step_batch import Row, RowResult, StepOutput
from service.sessions.journal_record import session_of
from service.tracebacks import drop_tracebacks

log = logging.getLogger(__name__)


@dataclass
class QueuedRow:
    """A feed row waiting for (or in) a step, with the group it answers to."""

    owner: RowOwner
    row: Row
    group: RowGroup
    index: int  # the row's place in its group
    enqueued_at: float = field(default_factory=time.perf_counter)


class StepSettlement:
    def __init__(
        self,
        runner: ModelRunner,
        model: str,
        version: str,
        commit: Commit | None,
        on_stats: Callable[[StepStats], None],
        on_token_times: Callable[[list[float], list[float]], None],
        *,
        retire: Callable[[Generation], None],
    ) -> None:
        self._runner = runner
        self._model, self._version = model, version
        self._commit = commit  # group commit of each step's journal records (None: no journal)
        self._on_stats = on_stats
        # Once a step with generations: (times to first token, inter-token gaps), in seconds.
        self._on_token_times = on_token_times
        self._retire = retire  # a generation no step will run again

    def failed(self, gens: list[Generation], feeds: list[QueuedRow], exc: Exception) -> None:
        log.exception("step failed for %s:%s", self._model, self._version)
        self._refuse(gens, feeds, exc)

    def _refuse(self, gens: list[Generation], feeds: list[QueuedRow], exc: Exception) -> None:
        """Every row of the step gets `exc` (without its traceback, whose frames hold the
        step's rows, and through them their results: a cycle per refused step; a bug's was
        logged by `failed`); its generations run no more steps."""
        drop_tracebacks(exc)
        for f in feeds:
            f.group.settle(f.index, exc)
        for gen in gens:
            gen.tokens.put_nowait(exc)
            self._retire(gen)

    def settle(
        self,
        gens: list[Generation],
        feeds: list[QueuedRow],
        rows: list[Row],
        output: StepOutput,
        started: float,
    ) -> None:
        """After a step: journal it (or undo it, if it cannot be), hand out the results,
        report the stats."""
        segment: int | None = None
        results = output.results
        if self._commit is not None:
            records = self._records(gens, feeds, rows, results)
            try:
                try:
                    segment = self._commit(records)
                except SessionMoved as moved:  # the rest of the batch still counts
                    gens, feeds, results = self._without(moved, records, gens, feeds, results)
                    kept = [r for r in records if session_of(r) not in moved.session_ids]
                    segment = self._commit(kept) if kept else None
            except Unavailable as exc:  # not durable: the step must not count
                self._undo(rows, output)
                self._refuse(gens, feeds, exc)
                return
        self._fan_out(gens, feeds, results, segment)
        t = output.timings
        self._on_stats(
            StepStats(
                model=self._model,
                version=self._version,
                rows=len(rows),
                tokens_in=sum(r.consumed for r in output.results[len(gens) :]),
                tokens_generated=len(gens),
                queue_wait_seconds=[started - f.enqueued_at for f in feeds],
                gather_seconds=t.gather_seconds,
                forward_seconds=t.forward_seconds,
                scatter_seconds=t.scatter_seconds,
                sample_seconds=t.sample_seconds,
                total_seconds=time.perf_counter() - started,
                cpu_seconds=t.cpu_seconds,
            )
        )

    def _records(
        self,
        gens: list[Generation],
        feeds: list[QueuedRow],
        rows: list[Row],
        results: list[RowResult],
    ) -> list[bytes]:
        owners: list[RowOwner] = [g.owner for g in gens] + [f.owner for f in feeds]
        return [o.record(r, res) for o, r, res in zip(owners, rows, results, strict=True)]

    def _without(
        self,
        moved: SessionMoved,
        records: list[bytes],
        gens: list[Generation],
        feeds: list[QueuedRow],
        results: list[RowResult],
    ) -> tuple[list[Generation], list[QueuedRow], list[RowResult]]:
        """Fail the rows of sessions another process holds now (their copies here are stale,
        and are dropped at their next request); the batch without them."""
        fenced = {i for i, r in enumerate(records) if session_of(r) in moved.session_ids}
        kept_gens, kept_feeds, kept_results = [], [], []
        for i, gen in enumerate(gens):
            if i in fenced:
                gen.tokens.put_nowait(moved)
                self._retire(gen)
            else:
                kept_gens.append(gen)
                kept_results.append(results[i])
        for j, feed in enumerate(feeds):
            if len(gens) + j in fenced:
                feed.group.settle(feed.index, moved)
            else:
                kept_feeds.append(feed)
                kept_results.append(results[len(gens) + j])
        return kept_gens, kept_feeds, kept_results

    def _undo(self, rows: list[Row], output: StepOutput) -> None:
        """Put the step's rows back as they were, random streams included."""
        self._runner.undo(output)
        for row in rows:
            if row.inputs is None and row.rng is not None and row.sampling is not None:
                row.rng.rewind(0 if row.sampling.temperature == 0.0 else 1)

    def _fan_out(
        self,
        gens: list[Generation],
        feeds: list[QueuedRow],
        results: list[RowResult],
        segment: int | None,
    ) -> None:
        now = time.perf_counter()
        firsts: list[float] = []  # send -> first token, of generations that started
        gaps: list[float] = []  # since the last token, of the others
        for gen, res in zip(gens, results[: len(gens)], strict=True):
            assert res.token is not None
            token = gen.advance(res.token, res.consumed, segment)
            if gen.last_token_at is None:
                firsts.append(now - gen.started_at)
            else:
                gaps.append(now - gen.last_token_at)
            gen.last_token_at = now
            gen.tokens.put_nowait(token)
            if gen.finished:
                self._retire(gen)
            else:
                gen.head = res.head  # what its next row samples from
        if gens:
            self._on_token_times(firsts, gaps)
        for feed, res in zip(feeds, results[len(gens) :], strict=True):
            res.position = feed.owner.advance(res.consumed, segment)
            feed.group.settle(feed.index, res)

"""Continuous batching for one loaded model version.

One loop per version: wait until rows are pending, give producers one event-loop tick to add
theirs, take the pending rows (up to `max_batch_size`) together with every running generation,
run the batch on the runner's thread, fan the results out, repeat. Flushing what is pending at
each tick beat waiting on a timer here: the step itself is the batching window. Generations stay
in the batch step after step until they finish or are cancelled.

The scheduler knows nothing of sessions. Each row comes with its owner, told how many inputs
the step consumed the moment the state changed (so position and state never disagree), and
the session lease guarantees at most one row per session is ever queued or running.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from service.engine.batch_window import BatchWindow
from service.engine.generation import Generation
from service.engine.row_group import Commit, RowGroup, RowOwner
from service.engine.step_settlement import QueuedRow, StepSettlement
from service.errors import QueueFull, Unavailable
from service.metrics.stats import StepStats
from service.runtime.runner import ModelRunner
from service.runtime.step_batch import Row, StepBatch


class StepScheduler:
    def __init__(
        self,
        runner: ModelRunner,
        model: str,
        version: int,
        max_batch_size: int,
        max_queue: int,
        inline_max_rows: int,
        on_stats: Callable[[StepStats], None],
        on_token_times: Callable[[list[float], list[float]], None],
        commit: Commit | None = None,
    ) -> None:
        self._runner = runner
        self._model, self._version = model, str(version)
        self._max_batch = max_batch_size
        self._max_queue = max_queue
        # On one CPU the runner thread overlaps nothing and its hand-off costs ~0.06 ms of CPU
        # per token at 64 sessions (measured: 0.31 → 0.24 ms/token, rows per step 27 → 40),
        # so every batch of one-input feeds runs inline, and so does every step of
        # generations once each has its first token (`_inline_limit`). Inline generation steps
        # used to send each stream's tokens in bursts (a loop that never waits: inter-token
        # p99 12.7 → 35 ms at 64, docs/per-core-passes.md, "Eleventh pass"); now the window
        # waits, without ticking, until each consumer has taken the last step's token
        # (`BatchWindow`), and the tail is shorter than with steps on the thread
        # (docs/per-core-passes.md, "Fourteenth pass").
        # Not with an accelerator: there the runner thread overlaps the loop's work with the
        # wait for the device, which an inline step would spend blocking the loop.
        on_cpu = runner.device.type == "cpu"
        one_cpu = inline_max_rows > 0 and _one_cpu() and on_cpu  # 0 still means never
        self._inline_rows = max_batch_size if one_cpu else inline_max_rows
        # After each step: journal it (`commit`: group commit of its records; None: no
        # journal), hand out the results, report stats and token times.
        self._settlement = StepSettlement(
            runner, model, self._version, commit, on_stats, on_token_times, retire=self._retire
        )
        self._pending: deque[QueuedRow] = deque()
        self._generations: list[Generation] = []
        self._loop = asyncio.get_running_loop()  # looked up once: each lookup is a getpid call
        self._window = BatchWindow(max_batch_size, self._loop)  # when to stop gathering and step
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"runner-{model}")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle = False  # the loop is parked, waiting for rows: no step runs or gathers

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the scheduler runs on (the one it was made on)."""
        return self._loop

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_generations(self) -> int:
        return len(self._generations)

    def start(self) -> None:
        # A fresh context: the loop outlives the request that started it, and must not run as
        # that request's principal.
        self._task = self._loop.create_task(
            self._run(), name="step-scheduler", context=contextvars.Context()
        )

    def submit(self, work: list[tuple[RowOwner, Row]]) -> RowGroup:
        """Queue rows (one per session); the group's future resolves after the steps that
        consumed them. Raises QueueFull (RESOURCE_EXHAUSTED) when the queue cannot take them all."""
        if self._stopping:
            raise Unavailable("model version is shutting down")
        if len(self._pending) + len(work) > self._max_queue:
            raise QueueFull(
                f"step queue full for {self._model}:{self._version}: {len(self._pending)} rows "
                f"pending and {len(work)} more asked, at most {self._max_queue}; "
                + (
                    "retry shortly, or raise SEQSERVE_ENGINE__MAX_QUEUE"
                    if len(work) <= self._max_queue
                    else "more than the queue ever takes at once: send fewer sessions a "
                    "message, or raise SEQSERVE_ENGINE__MAX_QUEUE"
                )
            )
        group = RowGroup(len(work), self._loop)
        now = time.perf_counter()
        queued = [QueuedRow(owner, row, group, i, now) for i, (owner, row) in enumerate(work)]
        if self._direct(queued):
            self._step_now(queued)  # settled when this returns
            return group
        self._pending.extend(queued)
        self._wakeup.set()
        return group

    def start_generation(self, generation: Generation) -> None:
        """Keep `generation` in every step until it finishes or is cancelled; its `retired`
        future resolves once no step will touch its row again."""
        if self._stopping:
            raise Unavailable("model version is shutting down")
        self._generations.append(generation)
        self._wakeup.set()

    async def stop(self) -> None:
        """Finish the step in flight, fail what is still queued, stop the loop."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            if not self._pending and not self._generations:
                if self._stopping:
                    break
                self._wakeup.clear()  # a set left over from rows already stepped says nothing
                self._idle = True
                try:
                    await self._wakeup.wait()
                finally:
                    self._idle = False
            await self._window.gather(self._pending, self._generations)
            self._retire_cancelled()
            if self._stopping:
                draining = Unavailable("server is draining; retry on another replica")
                self._fail_pending(draining)
                for gen in list(self._generations):
                    gen.tokens.put_nowait(draining)  # its consumer stops waiting for tokens
                    self._retire(gen)
                continue
            await self._step_pending()

    async def _step_pending(self) -> None:
        """One step of what is pending and every running generation. Its own call, so that
        the batch it held (rows, leases, their sessions) is let go when it returns, not kept
        by a parked scheduler's frame until the next step: a closed session's objects are
        freed then, by their reference count."""
        feeds = self._take(self._max_batch - len(self._generations))
        gens = list(self._generations)
        if not feeds and not gens:
            return
        rows = [g.row() for g in gens] + [f.row for f in feeds]
        self._window.stepped([r.slot for r in rows])
        started = time.perf_counter()
        try:
            inline = self._inline_rows
            if gens:  # a generation's first step never runs inline (see `_inline_limit`)
                inline = self._inline_limit(gens)
            if len(rows) <= inline and all(
                r.inputs is None or r.inputs.shape[0] == 1 for r in rows
            ):
                # A lone one-input row: handing it to the runner thread and back costs more
                # than the step (~0.25 ms of 1.3 ms per token for one session, measured).
                # Chunks always go to the thread: they would stall the loop.
                output = self._runner.execute(StepBatch(rows))
            else:
                output = await self._loop.run_in_executor(
                    self._executor, self._runner.execute, StepBatch(rows)
                )
        except Exception as exc:  # a bug in the runner: fail this batch, keep serving
            self._settlement.failed(gens, feeds, exc)
            return
        self._settlement.settle(gens, feeds, rows, output, started)

    def _direct(self, queued: list[QueuedRow]) -> bool:
        """Whether `queued` may step now, in the caller, instead of waking the loop: one
        session's one-input row, back alone (so the loop would gather nothing and step it
        inline at once) on a scheduler parked with nothing else to do. One session's feed then
        costs no scheduler wake-up (a task switch and an event per token)."""
        if not (self._idle and len(queued) == 1 and self._inline_rows >= 1):
            return False
        row = queued[0].row
        return (
            not self._pending
            and not self._generations
            and row.inputs is not None
            and row.inputs.shape[0] == 1
            and self._window.back_alone(row.slot)
        )

    def _step_now(self, queued: list[QueuedRow]) -> None:
        """The loop's step for `queued` (see `_direct`), run synchronously."""
        for q in queued:
            q.group.taken = True
        rows = [q.row for q in queued]
        self._window.stepped([r.slot for r in rows])
        started = time.perf_counter()
        try:
            output = self._runner.execute(StepBatch(rows))
        except Exception as exc:  # a bug in the runner: fail this row, keep serving
            self._settlement.failed([], queued, exc)
            return
        self._settlement.settle([], queued, rows, output, started)

    def _inline_limit(self, gens: list[Generation]) -> int:
        """The most rows a step with generations may run inline: none while one of them waits
        for its first token, else as many as a step of feeds. An inline step blocks the loop,
        so generations started together would be taken in one per step; on the runner thread
        the loop takes in the next calls meanwhile, and they join the following step."""
        if any(g.last_token_at is None for g in gens):
            return 0
        return self._inline_rows

    def _take(self, room: int) -> list[QueuedRow]:
        """Up to `room` pending rows (at least one, so feeds progress beside generations)."""
        taken: list[QueuedRow] = []
        while self._pending and len(taken) < max(room, 1):
            queued = self._pending.popleft()
            if not queued.group.future.cancelled():
                queued.group.taken = True
                taken.append(queued)
        return taken

    def _retire_cancelled(self) -> None:
        for gen in [g for g in self._generations if g.cancelled]:
            self._retire(gen)

    def _retire(self, gen: Generation) -> None:
        if gen in self._generations:
            self._generations.remove(gen)
            gen.retire()

    def _fail_pending(self, exc: Exception) -> None:
        while self._pending:
            feed = self._pending.popleft()
            feed.group.settle(feed.index, exc)


def _one_cpu() -> bool:
    """Whether this process may run on a single CPU only (pinned, or a one-core machine)."""
    try:
        return len(os.sched_getaffinity(0)) == 1
    except AttributeError:  # not on Linux
        return (os.cpu_count() or 1) == 1

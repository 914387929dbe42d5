"""When a step scheduler stops gathering rows and steps: its batching window, with no timer.

A busy loop reads a burst of messages over several ticks (each message takes a few hops from
the socket to `submit`), and gRPC reads the socket on its own poller thread: on one core, a loop
that only spins ticks leaves that thread no CPU to hand over the messages already sent. So each
tick first yields the CPU (`sched_yield`: it returns at once when nothing else is runnable), and
four quiet ticks end the wait (two after a step of one row). A session that stepped alone last
time and is back alone does not wait at all: nothing says another row is coming, and its
latency would pay for it. (With generations there is always a wait: the loop must run between
inline steps.) Measured against two quiet ticks and no yield, on one core, one token per
message: at 64 sessions rows per step 40 → 52, at 16 sessions 3.5k → 4.3k tokens/s, one
session p50 0.80 → 0.73 ms.

A step with generations in company (more than one row waiting, a last step of several rows, or
rows arriving in the last window) waits `GENERATION_BURST_TICKS` quiet ticks: 64 Generate calls
arriving together came in about as fast as steps of one or two rows ran, each ~0.6 ms, so the
first tokens went out in some thirty small steps. Interleaved on one core, two pairs: 64
one-token generations started at once p50 40 / 40 → 38 / 30 ms (p99 94 / 91 → 83 / 62), 64-token
ones 49 / 54 → 42 / 44 ms; a lone generation and 16 or 64 closed-loop generations unchanged.

What counts as arriving is every row queued and every generation started: a Generate call
joins the scheduler's generations, not its queue of rows, and a window that watched the queue
alone closed while a burst of them was still coming in, so each step took ~3 of them. Counting
them, `python -m benchmarks.ab burst64 burst64x1 gen1 gen16 gen64 stream1 stream64 --reps 3`
(medians, pinned): 64 Generate calls of 64 tokens started at once p50 52.2 → 22.2 ms, of one
token 27.9 → 24.3 ms; closed-loop loads within noise (gen64 8,256 / 8,082 tokens/s).

A window takes in at most `GENERATION_WINDOW_ARRIVALS` new generations before it steps: calls
that keep coming must not hold the running generations' next tokens, and a burst's first half
gets its tokens while the second half is taken in. Against the window without that bound
(`benchmarks.ab burst64 burst64x1 gen1 gen16 gen64 stream64 --reps 3`): 64-token bursts p50
21.7 → 16.4 ms, one-token 22.8 → 17.3 ms; closed-loop loads within noise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, Protocol

# Quiet ticks a step with generations waits while rows keep arriving (a burst of Generate calls
# being taken in): each one-row generation step costs ~0.6 ms, so fewer, fuller steps get the
# first tokens out sooner. A lone generation, with nothing arriving, waits the usual two.
GENERATION_BURST_TICKS = 8
# The most generations one window takes in before it steps. Calls that keep coming would
# otherwise hold it open (a generation is not a queued row, so no full batch ends it) and the
# running generations' next tokens with it; each call costs the loop ~0.2 ms to take in.
GENERATION_WINDOW_ARRIVALS = 32


class _Queued(Protocol):
    @property
    def row(self) -> Any: ...


class BatchWindow:
    def __init__(self, max_batch: int) -> None:
        self._max_batch = max_batch
        self._last_rows = 0  # rows in the last step
        self._lone: int | None = None  # the slot of the last step's row, if it had one only
        self._arriving = False  # rows came in while the last window was open

    def back_alone(self, slot: int) -> bool:
        """Whether a lone row on `slot` is the session that stepped alone last time: no wait
        for company (see `_quiet_ticks`)."""
        return slot == self._lone

    def stepped(self, slots: Sequence[int]) -> None:
        """A step of rows on these slots is about to run."""
        self._last_rows = len(slots)
        self._lone = slots[0] if len(slots) == 1 else None

    async def gather(self, pending: Sequence[_Queued], generations: Sequence[object]) -> None:
        """Yield ticks until enough in a row bring nothing new, or a full batch waits. Both
        lists only grow while the window is open: a Generate call taken in (a generation) is
        company as much as a queued feed."""
        quiet_ticks = self._quiet_ticks(pending, bool(generations))
        started = len(generations)
        first = seen = len(pending) + started
        quiet = 0
        while (
            quiet < quiet_ticks
            and len(pending) < self._max_batch
            and len(generations) - started < GENERATION_WINDOW_ARRIVALS
        ):
            _yield_cpu()
            await asyncio.sleep(0)
            now = len(pending) + len(generations)
            quiet = quiet + 1 if now == seen else 0
            seen = now
        self._arriving = seen > first

    def _quiet_ticks(self, pending: Sequence[_Queued], generating: bool) -> int:
        if not generating and len(pending) == 1 and self.back_alone(pending[0].row.slot):
            return 0  # the session that stepped alone last time is back, alone
        if generating and (self._arriving or len(pending) > 1 or self._last_rows > 1):
            return GENERATION_BURST_TICKS  # calls keep coming in: take more first tokens at once
        return 4 if self._last_rows > 1 else 2


def _yield_cpu() -> None:
    """Give the CPU to another runnable thread of this machine, if there is one."""
    if hasattr(os, "sched_yield"):
        os.sched_yield()

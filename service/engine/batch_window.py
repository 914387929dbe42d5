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

A window with generations, once quiet, also waits until each generation's consumer has taken
the last step's token (its handler passes it on to gRPC before it next yields the loop), at most
`SEND_WAIT_SECONDS`: stepping again before then sent each stream's tokens in bursts on one core
(inter-token p99 11-13 → 26-31 ms at 64 generations once the sampler got faster). The wait
spins nothing: the last consumer to take its token wakes the window (`Channel.on_drained`). A
consumer two tokens behind (its client is not reading) is not waited for; one that stops reading
delays a single step by the bound. It replaced up to 16 ticks of polling, and let generation
steps run on the loop thread (docs/per-core-passes.md, "Fourteenth pass").

A window takes in at most `GENERATION_WINDOW_ARRIVALS` new generations before it steps: calls
that keep coming must not hold the running generations' next tokens, and a burst's first half
gets its tokens while the second half is taken in. Against the window without that bound
(`benchmarks.ab burst64 burst64x1 gen1 gen16 gen64 stream64 --reps 3`): 64-token bursts p50
21.7 → 16.4 ms, one-token 22.8 → 17.3 ms; closed-loop loads within noise.

On a saturated loop (its thread running or waiting for a CPU `SATURATED_SHARE` of its time
outside the windows or more) a window of feeds alone waits `SATURATED_TICKS` quiet ticks
(generations keep their own rules above: a burst of one-token Generate calls lost tokens/s
with it). A unary call (CreateSession with a prefix, Step) reaches `submit` several ticks after
gRPC hands it over, so 64 clients each creating a session and feeding it stepped one row at a
time: the one-row step, two quiet ticks, the next row. Stable, since a step of one row sets
the next window to two ticks again (1.0-1.8 rows a step, counted). A saturated loop has no idle
time to lose to a longer wait, and its rows are on their way. The windows' own time is left
out of the share: a window never blocks, and its yields (to another process, say) would read
as busy and keep long windows going by themselves. Pinned, 64 clients creating sessions, side
by side with the tree before (docs/per-core-passes.md, "Tenth pass"): CreateSession + Step 298-399 →
915-928 sessions/s (1.6-1.8 → 52-53 rows a step), a prefix in CreateSession 842-995 → 1,040-1,674 /s
(20-23 → 62 rows).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

# Quiet ticks a step with generations waits while rows keep arriving (a burst of Generate calls
# being taken in): each one-row generation step costs ~0.6 ms, so fewer, fuller steps get the
# first tokens out sooner. A lone generation, with nothing arriving, waits the usual two.
GENERATION_BURST_TICKS = 8
# Quiet ticks any window waits while the loop thread is saturated (busy at least
# `SATURATED_SHARE` of the last `BUSY_SAMPLE_SECONDS` or more): unary calls (CreateSession with a
# prefix, Step) reach `submit` several ticks after gRPC hands them over, so a short window steps
# them one by one, each one-row step costing the loop more than the ticks a longer window would.
SATURATED_TICKS = 8
SATURATED_SHARE = 0.75
BUSY_SAMPLE_SECONDS = 0.01
# The longest a step with generations waits for their consumers to take the last step's tokens
# (each takes its next token once gRPC has taken the one before). Not a batching delay: it ends
# as soon as the last consumer has taken its token, and bounds only a slow reader.
SEND_WAIT_SECONDS = 0.002
# The most generations one window takes in before it steps. Calls that keep coming would
# otherwise hold it open (a generation is not a queued row, so no full batch ends it) and the
# running generations' next tokens with it; each call costs the loop ~0.2 ms to take in.
GENERATION_WINDOW_ARRIVALS = 32


class _Queued(Protocol):
    @property
    def row(self) -> Any: ...


class _Sending(Protocol):
    """A generation as the window sees it: its tokens on their way to its consumer."""

    cancelled: bool

    @property
    def tokens(self) -> Any: ...


class BatchWindow:
    def __init__(self, max_batch: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._max_batch = max_batch
        self._loop = loop  # the scheduler's (looked up on first use if None)
        self._last_rows = 0  # rows in the last step
        self._lone: int | None = None  # the slot of the last step's row, if it had one only
        self._arriving = False  # rows came in while the last window was open
        # The loop thread's busy share (run or waiting to run) over the last sample.
        self._sampled_at, self._sampled_cpu = _wall_seconds(), _cpu_seconds()
        self._busy = 0.0
        self._in_windows = 0.0  # wall seconds spent gathering since the sample was taken

    def back_alone(self, slot: int) -> bool:
        """Whether a lone row on `slot` is the session that stepped alone last time: no wait
        for company (see `_quiet_ticks`)."""
        return slot == self._lone

    def stepped(self, slots: Sequence[int]) -> None:
        """A step of rows on these slots is about to run."""
        self._last_rows = len(slots)
        self._lone = slots[0] if len(slots) == 1 else None

    async def gather(self, pending: Sequence[_Queued], generations: Sequence[_Sending]) -> None:
        """Yield ticks until enough in a row bring nothing new, or a full batch waits. Both
        lists only grow while the window is open: a Generate call taken in (a generation) is
        company as much as a queued feed."""
        opened = _wall_seconds()
        quiet_ticks = self._quiet_ticks(pending, bool(generations))
        started = len(generations)
        first = seen = len(pending) + started
        quiet = 0
        waited = False
        while (
            len(pending) < self._max_batch
            and len(generations) - started < GENERATION_WINDOW_ARRIVALS
        ):
            if quiet >= quiet_ticks:
                if generations and not waited:
                    # Quiet; but stepping again before the generations' consumers have taken
                    # the last step's tokens made each stream's tokens go out in bursts on one
                    # core. Wait for them (no ticks: the last one to take its token wakes us).
                    waited = True
                    await self._consumers_caught_up(generations)
                    seen = max(seen, len(pending) + len(generations))  # calls taken in meanwhile
                    continue
                break
            _yield_cpu()
            await asyncio.sleep(0)
            now = len(pending) + len(generations)
            quiet = quiet + 1 if now == seen else 0
            seen = now
        self._arriving = seen > first
        self._in_windows += _wall_seconds() - opened

    async def _consumers_caught_up(self, generations: Sequence[_Sending]) -> None:
        """Wait until each generation's consumer that holds exactly the last step's token has
        taken it (its handler passes it on to gRPC before it next yields the loop),
        `SEND_WAIT_SECONDS` at most: a consumer that does not read (its client's flow control)
        delays one step by that much, then falls two tokens behind and is not waited for again
        until it catches up. One that leaves (`Channel.abandon`) is not waited for either."""
        behind = [g.tokens for g in generations if not g.cancelled and g.tokens.qsize() == 1]
        if not behind:
            return
        loop = self._loop = self._loop or asyncio.get_running_loop()
        done = loop.create_future()
        left = len(behind)

        def back() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                _release(done)

        for channel in behind:
            channel.on_drained = back
        timer = loop.call_later(SEND_WAIT_SECONDS, _release, done)
        try:
            await done
        finally:
            timer.cancel()
            for channel in behind:
                if channel.on_drained is back:
                    channel.on_drained = None

    def _quiet_ticks(self, pending: Sequence[_Queued], generating: bool) -> int:
        if not generating and len(pending) == 1 and self.back_alone(pending[0].row.slot):
            return 0  # the session that stepped alone last time is back, alone
        if generating and (self._arriving or len(pending) > 1 or self._last_rows > 1):
            return GENERATION_BURST_TICKS  # calls keep coming in: take more first tokens at once
        if not generating and self._saturated():
            return SATURATED_TICKS  # the loop has no idle time: rows are on their way
        return 4 if self._last_rows > 1 else 2

    def _saturated(self) -> bool:
        """Whether the loop thread was busy most of the last sample (re-taken once it is
        `BUSY_SAMPLE_SECONDS` old: a clock and a `pread` a window at most)."""
        now = _wall_seconds()
        if now - self._sampled_at >= BUSY_SAMPLE_SECONDS:
            cpu = _cpu_seconds()
            # The windows' own time is left out: a window never blocks, so its ticks (and a
            # CPU yielded to another process in them) read as busy, and a longer window would
            # keep the loop "saturated" by itself.
            outside = now - self._sampled_at - self._in_windows
            if outside > 0.1 * BUSY_SAMPLE_SECONDS:
                self._busy = max(0.0, cpu - self._sampled_cpu - self._in_windows) / outside
            else:  # gathering nearly all the time: rows keep coming
                self._busy = 1.0
            self._sampled_at, self._sampled_cpu, self._in_windows = now, cpu, 0.0
        return self._busy >= SATURATED_SHARE


def _release(done: asyncio.Future[None]) -> None:
    """End a wait for consumers (the last one took its token, or the bound came)."""
    if not done.done():
        done.set_result(None)


_STATS: dict[int, int] = {}  # thread id -> open descriptor of its schedstat (Linux)


def _cpu_seconds() -> float:
    """Seconds the calling thread (the loop's: windows are gathered on it) has run or waited
    for a CPU: its CPU time and its run-queue wait from `/proc/self/task/<tid>/schedstat`, or
    its CPU time alone where that file is missing. A loop starved of its core by the process's
    other threads is as busy as one running: either way it has no idle time. (Its CPU time
    alone read ~0.6-0.7 for a loop that never idled, beside gRPC's and the store's threads.)"""
    tid = threading.get_native_id()
    fd = _STATS.get(tid)
    if fd is None:
        try:
            fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        _STATS[tid] = fd
    if fd >= 0:
        try:
            ran, waited = os.pread(fd, 128, 0).split()[:2]
            return (int(ran) + int(waited)) / 1e9
        except (OSError, ValueError):
            pass
    return time.thread_time()


_wall_seconds = time.perf_counter


def _yield_cpu() -> None:
    """Give the CPU to another runnable thread of this machine, if there is one."""
    if hasattr(os, "sched_yield"):
        os.sched_yield()

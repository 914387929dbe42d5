"""BatchWindow: how many quiet ticks a step waits for more rows, counted by the CPU yields."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from service.engine import batch_window
from service.engine.batch_window import (
    BUSY_SAMPLE_SECONDS,
    GENERATION_BURST_TICKS,
    GENERATION_WINDOW_ARRIVALS,
    SATURATED_SHARE,
    SATURATED_TICKS,
    BatchWindow,
)
from service.engine.channel import Channel

REAL_BUSY_CLOCK = batch_window._cpu_seconds  # before the fixture below replaces it


class LoopClocks:
    """The wall clock and the loop thread's CPU clock a window reads, moved by hand."""

    def __init__(self) -> None:
        self.wall = self.cpu = 100.0

    def run(self, seconds: float, busy: float) -> None:
        """`seconds` pass, the loop busy for `busy` of them."""
        self.wall += seconds
        self.cpu += seconds * busy


@pytest.fixture(autouse=True)
def clocks(monkeypatch: pytest.MonkeyPatch) -> LoopClocks:
    """An idle loop unless a test says otherwise (the real clocks would make the windows
    depend on how busy this machine is)."""
    clocks = LoopClocks()
    monkeypatch.setattr(batch_window, "_wall_seconds", lambda: clocks.wall)
    monkeypatch.setattr(batch_window, "_cpu_seconds", lambda: clocks.cpu)
    return clocks


class FakeGeneration:
    """A generation as the window sees it: `unsent` tokens its consumer has not taken."""

    def __init__(self, unsent: int = 0) -> None:
        self.cancelled = False
        self.tokens: Channel[int] = Channel()
        for token in range(unsent):
            self.tokens.put_nowait(token)


def _rows(*slots: int) -> list[Any]:
    return [SimpleNamespace(row=SimpleNamespace(slot=s)) for s in slots]


async def _gather(window: BatchWindow, pending: list[Any], generating: bool) -> None:
    """A window whose only arrivals are rows queued in `pending` (beside one running
    generation, if `generating`)."""
    await window.gather(pending, [FakeGeneration()] if generating else [])


@pytest.fixture
def ticks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per tick the window waits (each tick yields the CPU first)."""
    seen: list[int] = []
    monkeypatch.setattr(batch_window, "_yield_cpu", lambda: seen.append(1))
    return seen


async def test_a_lone_generation_waits_two_quiet_ticks(ticks: list[int]) -> None:
    window = BatchWindow(max_batch=64)
    window.stepped([5])
    await _gather(window, _rows(5), generating=True)
    assert len(ticks) == 2


@pytest.mark.parametrize(("last_step", "pending"), [([1, 2], [1]), ([5], [1, 2])])
async def test_generations_in_company_wait_longer_for_more_first_tokens(
    ticks: list[int], last_step: list[int], pending: list[int]
) -> None:
    window = BatchWindow(max_batch=64)
    window.stepped(last_step)
    await _gather(window, _rows(*pending), generating=True)
    assert len(ticks) == GENERATION_BURST_TICKS


async def test_a_row_arriving_in_the_window_makes_the_next_generation_step_wait_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    window = BatchWindow(max_batch=64)
    window.stepped([5])
    pending = _rows(5)
    seen: list[int] = []

    def tick() -> None:
        seen.append(1)
        if len(seen) == 1:
            pending.extend(_rows(6))  # a call taken in while the window is open

    monkeypatch.setattr(batch_window, "_yield_cpu", tick)
    await _gather(window, pending, generating=True)
    assert len(seen) == 1 + 2  # the arrival restarts the count of quiet ticks
    window.stepped([7])
    seen.clear()
    await _gather(window, _rows(7), generating=True)
    assert len(seen) == GENERATION_BURST_TICKS


async def test_feeds_keep_their_window(ticks: list[int]) -> None:
    window = BatchWindow(max_batch=64)
    window.stepped([1, 2])
    await _gather(window, _rows(3), generating=False)
    assert len(ticks) == 4
    window.stepped([3])
    ticks.clear()
    await _gather(window, _rows(3), generating=False)
    assert ticks == []  # back alone: no wait


async def test_a_full_batch_does_not_wait(ticks: list[int]) -> None:
    window = BatchWindow(max_batch=2)
    window.stepped([1, 2])
    await _gather(window, _rows(1, 2), generating=True)
    assert ticks == []


async def test_a_generation_started_in_the_window_is_company_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Generate calls join the scheduler's generations, not the queue of rows: the window counts
    them as arrivals all the same, so a burst of them is taken into one step, not one by one."""
    window = BatchWindow(max_batch=64)
    window.stepped([5])
    generations: list[Any] = [FakeGeneration()]
    calls_to_come = [3]
    seen: list[int] = []

    def tick() -> None:
        seen.append(1)
        if calls_to_come[0]:
            calls_to_come[0] -= 1
            generations.append(FakeGeneration())  # a call taken in on each of the first three ticks

    monkeypatch.setattr(batch_window, "_yield_cpu", tick)
    await window.gather([], generations)
    assert len(seen) == 3 + 2  # each arrival restarted the count of two quiet ticks
    window.stepped([5, 6, 7, 8])
    seen.clear()
    await window.gather([], generations)
    assert len(seen) == GENERATION_BURST_TICKS  # calls were arriving: the next step waits longer


async def test_calls_that_keep_coming_do_not_hold_a_generation_step_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Generate call on every tick, without end: the window steps after taking in
    GENERATION_WINDOW_ARRIVALS of them, so the running generations' next tokens wait for no
    more than that. Queued feeds arriving as fast (beside running generations) stop it only at
    a full batch."""
    generations: list[Any] = [FakeGeneration()]
    seen: list[int] = []

    def tick() -> None:
        seen.append(1)
        generations.append(FakeGeneration())
        assert len(seen) < 1000, "the window never closed"

    monkeypatch.setattr(batch_window, "_yield_cpu", tick)
    window = BatchWindow(max_batch=256)
    window.stepped([1, 2])
    await window.gather([], generations)
    assert len(seen) == GENERATION_WINDOW_ARRIVALS

    pending: list[Any] = []
    seen.clear()

    def feed_tick() -> None:
        seen.append(1)
        pending.extend(_rows(len(pending)))

    monkeypatch.setattr(batch_window, "_yield_cpu", feed_tick)
    await window.gather(pending, [FakeGeneration()])
    assert len(seen) == len(pending) == 256  # feeds, beside generations: a full batch ends it


async def test_a_saturated_loop_waits_longer_for_company(
    ticks: list[int], clocks: LoopClocks
) -> None:
    """Unary calls reach `submit` several ticks after gRPC hands them over: on a loop with no
    idle time, two quiet ticks after a one-row step would step each of them alone."""
    window = BatchWindow(max_batch=64)
    window.stepped([1])
    clocks.run(BUSY_SAMPLE_SECONDS, busy=1.0)
    await _gather(window, _rows(2), generating=False)
    assert len(ticks) == SATURATED_TICKS
    window.stepped([1, 2])
    ticks.clear()
    await _gather(window, _rows(3), generating=False)  # the sample is still fresh: saturated
    assert len(ticks) == SATURATED_TICKS
    window.stepped([3])
    ticks.clear()
    await _gather(window, _rows(3), generating=True)  # a lone generation keeps its own rule
    assert len(ticks) == 2
    ticks.clear()
    await _gather(window, _rows(3), generating=False)  # back alone: still no wait
    assert ticks == []


@pytest.mark.parametrize("busy", [0.0, SATURATED_SHARE - 0.05])
async def test_a_loop_with_idle_time_keeps_the_short_window(
    ticks: list[int], clocks: LoopClocks, busy: float
) -> None:
    window = BatchWindow(max_batch=64)
    clocks.run(1.0, busy=1.0)
    window.stepped([1])
    await _gather(window, _rows(2), generating=False)
    assert len(ticks) == SATURATED_TICKS  # a whole second saturated
    clocks.run(BUSY_SAMPLE_SECONDS / 2, busy=busy)
    window.stepped([2])
    ticks.clear()
    await _gather(window, _rows(3), generating=False)
    assert len(ticks) == SATURATED_TICKS  # too soon to sample again
    clocks.run(BUSY_SAMPLE_SECONDS, busy=busy)
    window.stepped([3])
    ticks.clear()
    await _gather(window, _rows(4), generating=False)
    assert len(ticks) == 2  # the new sample has idle time: after a one-row step, two


def test_the_loop_s_busy_clock_counts_running_and_not_sleeping() -> None:
    """The real clock: the calling thread's time running or waiting for a CPU."""
    clock = REAL_BUSY_CLOCK
    start = clock()
    until = time.perf_counter() + 0.1
    while time.perf_counter() < until:
        pass
    assert clock() - start >= 0.05  # (a VM's stolen time counts as neither)
    start = clock()
    time.sleep(0.1)
    assert clock() - start < 0.03  # asleep (as a loop in epoll): idle


async def test_a_step_with_generations_waits_for_their_consumers_to_take_the_last_tokens(
    ticks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quiet, but a consumer has not taken the last step's token (it is still sending the one
    before): stepping again at once made each stream's tokens go out in bursts. The window
    waits until every such consumer has taken it, with no ticks of its own: it is woken by the
    last one (the bound is raised here so that only that can end the wait)."""
    monkeypatch.setattr(batch_window, "SEND_WAIT_SECONDS", 30.0)
    window = BatchWindow(max_batch=64)
    window.stepped([1])  # a step of one row before: two quiet ticks
    waiting = [FakeGeneration(unsent=1), FakeGeneration(unsent=1)]
    caught_up = FakeGeneration()  # took its token already: nothing to wait for
    taken: list[int] = []

    async def consumer(generation: FakeGeneration, sends: int) -> None:
        for _ in range(sends):  # each send takes the loop a few turns
            await asyncio.sleep(0)
        taken.append(await generation.tokens.get())

    sends = zip(waiting, (3, 12), strict=True)
    consumers = [asyncio.ensure_future(consumer(g, n)) for g, n in sends]
    await asyncio.wait_for(window.gather([], [caught_up, *waiting]), 10)
    assert len(taken) == 2  # stepped only once both consumers had taken their token
    assert len(ticks) == 2  # the two quiet ticks; the wait itself spins nothing
    await asyncio.gather(*consumers)


async def test_a_consumer_that_does_not_read_delays_one_step_at_most_send_wait(
    ticks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops reading holds its token: the window waits SEND_WAIT_SECONDS for it,
    then steps, leaving no hook behind. After that step it is two tokens behind and not waited
    for again; nor is a cancelled generation's consumer."""
    monkeypatch.setattr(batch_window, "SEND_WAIT_SECONDS", 1.0)
    window = BatchWindow(max_batch=64)
    stuck = FakeGeneration(unsent=1)
    window.stepped([1])
    started = time.monotonic()
    await asyncio.wait_for(window.gather([], [stuck]), 10)
    assert time.monotonic() - started >= 0.9
    assert stuck.tokens.on_drained is None

    # Not waited for at all from here: told apart from a wait by a margin no stall of a
    # loaded host closes (a 0.5 s bound against a 1 s wait did not leave one).
    monkeypatch.setattr(batch_window, "SEND_WAIT_SECONDS", 60.0)
    stuck.tokens.put_nowait(1)  # the next step's token: now two behind
    window.stepped([1])
    await asyncio.wait_for(window.gather([], [stuck]), 30)

    cancelled = FakeGeneration(unsent=1)
    cancelled.cancelled = True
    window.stepped([1])
    await asyncio.wait_for(window.gather([], [cancelled]), 30)
    assert len(ticks) == 3 * 2  # two quiet ticks a window, nothing more


async def test_a_consumer_that_leaves_while_the_window_waits_for_it_ends_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that goes away holding its token (its generation is cancelled, the handler's
    `finally` abandons the channel) does not hold the other streams' next step."""
    monkeypatch.setattr(batch_window, "SEND_WAIT_SECONDS", 30.0)
    window = BatchWindow(max_batch=64)
    window.stepped([1])
    leaving = FakeGeneration(unsent=1)

    async def leave() -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        leaving.cancelled = True
        leaving.tokens.abandon()

    left = asyncio.ensure_future(leave())
    await asyncio.wait_for(window.gather([], [leaving]), 10)
    await left
    assert leaving.tokens.qsize() == 1  # never taken: the wait ended all the same


async def test_calls_taken_in_while_the_window_waits_for_consumers_count_as_arriving(
    ticks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generate calls that arrive during the wait join this step, and make the next window
    wait GENERATION_BURST_TICKS for more of them, as calls arriving in its ticks would."""
    monkeypatch.setattr(batch_window, "SEND_WAIT_SECONDS", 30.0)
    window = BatchWindow(max_batch=64)
    window.stepped([1])
    sending = FakeGeneration(unsent=1)
    generations: list[Any] = [sending]

    async def arrive_then_take() -> None:
        while sending.tokens.on_drained is None:  # until the window waits for this consumer
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
            generations.append(FakeGeneration())  # a call taken in during the wait
        await sending.tokens.get()

    consumer = asyncio.ensure_future(arrive_then_take())
    await asyncio.wait_for(window.gather([], generations), 10)
    await consumer
    assert len(generations) == 4 and len(ticks) == 2
    window.stepped([1])  # a step of one row: only the arrivals make the next window longer
    ticks.clear()
    await window.gather([], [FakeGeneration()])
    assert len(ticks) == GENERATION_BURST_TICKS

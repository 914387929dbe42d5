"""The step scheduler against a fake runner (a plain object that records each batch and returns
chosen outputs): batching, order, positions, generations, failures, limits, and which thread
runs a step. The real runner is tested in tests/runtime against tiny real models."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from service.engine.batch_window import GENERATION_WINDOW_ARRIVALS
from service.engine.generation import FINISH_MAX_TOKENS, Generation
from service.engine.step_scheduler import StepScheduler
from service.errors import JournalUnavailable, ResourceExhausted, Unavailable
from service.metrics.stats import StepStats
from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.step_batch import (
    Prediction,
    Row,
    RowResult,
    StepBatch,
    StepOutput,
    StepTimings,
)
from tests.polling import until


class FakeRunner:
    """Records every batch (the slots of its rows, and the thread it ran on); answers each feed
    row with a prediction naming its slot and each generate row with token `slot + 100`. Set
    `fail` to make the next step raise."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)  # where the pool lives (inline steps: CPU only)
        self.batches: list[list[int]] = []
        self.threads: list[threading.Thread] = []
        self.fail: Exception | None = None
        self.undone: list[StepOutput] = []
        self.heads: list[list[tuple[torch.Tensor, int] | None]] = []  # generate rows' Row.head
        self.outputs: list[torch.Tensor] = []  # each step's stand-in for its head output

    def execute(self, batch: StepBatch) -> StepOutput:
        self.batches.append([r.slot for r in batch.rows])
        self.heads.append([r.head for r in batch.rows if r.inputs is None])
        out = torch.zeros(len(batch.rows), 1)
        self.outputs.append(out)
        self.threads.append(threading.current_thread())
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        results = []
        for j, r in enumerate(batch.rows):
            if r.inputs is None:
                if r.rng is not None and r.sampling is not None and r.sampling.temperature:
                    r.rng.uniform()  # the draw the real sampler takes
                results.append(RowResult(consumed=1, token=r.slot + 100, head=(out, j)))
            else:
                consumed = int(r.inputs.shape[0])
                results.append(RowResult(consumed=consumed, prediction=Prediction(values=[r.slot])))
        return StepOutput(results, StepTimings())

    def undo(self, output: StepOutput) -> None:
        self.undone.append(output)


@dataclass
class Owner:
    """A row's owner: counts what the scheduler says each step consumed, and in which journal
    segment; its journal record names its slot and position."""

    position: int = 0
    advances: list[int] = field(default_factory=list)
    segments: list[int | None] = field(default_factory=list)

    def record(self, row: Row, result: RowResult) -> bytes:
        return f"{row.slot}@{self.position}".encode()

    def advance(self, consumed: int, segment: int | None = None) -> int:
        self.advances.append(consumed)
        self.segments.append(segment)
        self.position += consumed
        return self.position


class FakeLease(Owner):
    """What a Generation reads of its lease: the session's slot and RNG, and `advance`."""

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.session = SimpleNamespace(slot=slot, rng=None)


def feed(slot: int, tokens: int = 1) -> Row:
    return Row(slot=slot, inputs=torch.arange(tokens), top_k=1)


@pytest.fixture(autouse=True)
def idle_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop reads as having idle time, whatever the host's load: a loop thread waiting
    for a CPU reads as saturated, and a saturated loop's windows wait `SATURATED_TICKS` quiet
    ticks (tests/engine/test_batch_window.py checks that rule on its own clocks)."""
    monkeypatch.setattr("service.engine.batch_window._cpu_seconds", lambda: 0.0)


@pytest.fixture
async def scheduler() -> Any:
    made: list[StepScheduler] = []

    def make(runner: FakeRunner, **kwargs: Any) -> StepScheduler:
        options: dict[str, Any] = {
            "max_batch_size": 8, "max_queue": 64, "inline_max_rows": 1,
            "on_stats": lambda _s: None, "on_token_times": lambda _a, _b: None,
        }  # fmt: skip
        options.update(kwargs)
        s = StepScheduler(runner, "m", 1, **options)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


async def test_rows_of_one_tick_run_as_one_batch_in_order(scheduler: Any) -> None:
    runner = FakeRunner()
    stats: list[StepStats] = []
    s = scheduler(runner, on_stats=stats.append)
    owners = [Owner(position=10 * i) for i in range(3)]
    first = s.submit([(owners[0], feed(5)), (owners[1], feed(3, tokens=4))])
    second = s.submit([(owners[2], feed(9, tokens=2))])
    results = await asyncio.wait_for(first.future, 5)
    await asyncio.wait_for(second.future, 5)
    assert runner.batches == [[5, 3, 9]]  # both groups in one step, in submission order
    assert [r.prediction.values for r in results] == [[5], [3]]  # type: ignore[union-attr]
    assert [r.position for r in results] == [1, 14]  # each owner advanced by what it consumed
    assert [o.advances for o in owners] == [[1], [4], [2]]
    assert len(stats) == 1 and stats[0].rows == 3 and stats[0].tokens_in == 7
    assert len(stats[0].queue_wait_seconds) == 3


async def test_a_batch_holds_at_most_max_batch_size_rows(scheduler: Any) -> None:
    runner = FakeRunner()
    s = scheduler(runner, max_batch_size=2)
    group = s.submit([(Owner(), feed(slot)) for slot in range(5)])
    await asyncio.wait_for(group.future, 5)
    assert runner.batches == [[0, 1], [2, 3], [4]]


async def test_rows_arriving_over_consecutive_ticks_join_one_batch(scheduler: Any) -> None:
    """A busy loop delivers a burst of messages over several ticks: the scheduler keeps
    gathering while each tick brings rows, and flushes once ticks bring none."""
    runner = FakeRunner()
    s = scheduler(runner, max_batch_size=64)
    groups = [s.submit([(Owner(), feed(0))])]
    for slot in range(1, 6):
        await asyncio.sleep(0)  # one row per tick
        groups.append(s.submit([(Owner(), feed(slot))]))
    await asyncio.wait_for(asyncio.gather(*(g.future for g in groups)), 5)
    assert runner.batches == [[0, 1, 2, 3, 4, 5]]


async def test_a_lone_row_runs_within_a_few_ticks_with_no_timer(scheduler: Any) -> None:
    runner = FakeRunner()
    s = scheduler(runner)
    await asyncio.sleep(0)  # the scheduler's loop is waiting for work
    group = s.submit([(Owner(), feed(7))])
    ticks = 0
    while not group.future.done() and ticks < 50:
        await asyncio.sleep(0)
        ticks += 1
    assert group.future.done() and runner.batches == [[7]]
    assert ticks <= 6  # a wake-up, three gathering ticks, the step inline, the reply


async def test_a_session_back_alone_steps_at_once_and_a_newcomer_waits_for_company(
    scheduler: Any,
) -> None:
    """After a step of one row, the same session back alone is stepped with no gathering tick
    (nothing says another row is coming); any other row still waits a few ticks for those
    arriving just behind it."""
    runner = FakeRunner()
    s = scheduler(runner)
    await asyncio.wait_for(s.submit([(Owner(), feed(7))]).future, 5)
    again = s.submit([(Owner(), feed(7))])
    await asyncio.sleep(0)
    behind = s.submit([(Owner(), feed(9))])
    await asyncio.wait_for(asyncio.gather(again.future, behind.future), 5)
    assert runner.batches == [[7], [7], [9]]  # the lone session did not wait for 9
    newcomer = s.submit([(Owner(), feed(8))])
    await asyncio.sleep(0)
    joins = s.submit([(Owner(), feed(5))])
    await asyncio.wait_for(asyncio.gather(newcomer.future, joins.future), 5)
    assert runner.batches[-1] == [8, 5]  # another session's row gathered the one behind it


async def test_a_session_back_alone_on_an_idle_scheduler_steps_within_submit(
    scheduler: Any,
) -> None:
    """The loop would gather nothing for it and step it inline at once: it is stepped in the
    caller instead, sparing the loop a wake-up. Anyone else, or a chunk, or rows already
    waiting, still go through the loop."""
    runner, journal = FakeRunner(), Journal()
    stats: list[StepStats] = []
    s = scheduler(runner, on_stats=stats.append, commit=journal.commit)
    owner = Owner()
    await asyncio.wait_for(s.submit([(owner, feed(7))]).future, 5)  # through the loop
    await asyncio.sleep(0)  # the loop parks again
    again = s.submit([(owner, feed(7))])
    assert again.future.done()  # before submit returned
    (result,) = again.future.result()
    assert isinstance(result, RowResult) and result.position == 2 and owner.advances == [1, 1]
    assert journal.groups == [[b"7@0"], [b"7@1"]] and len(stats) == 2  # journaled, counted
    assert runner.threads[-1] is threading.current_thread()

    other = s.submit([(Owner(), feed(9))])  # another session: it waits for company
    assert not other.future.done()
    await asyncio.wait_for(other.future, 5)
    await asyncio.sleep(0)
    chunk = s.submit([(Owner(), feed(9, tokens=3))])  # a chunk goes to the runner thread
    assert not chunk.future.done()
    await asyncio.wait_for(chunk.future, 5)

    journal.full = True  # and a step that cannot be journaled is undone, in the caller too
    await asyncio.sleep(0)
    s.submit([(owner, feed(7))])  # (7 is not the last lone session now: through the loop)
    await asyncio.sleep(0.05)
    refused = s.submit([(owner, feed(7))])
    assert refused.future.done()
    (outcome,) = refused.future.result()
    assert isinstance(outcome, JournalUnavailable) and owner.advances == [1, 1]
    assert len(runner.undone) == 2


async def test_the_scheduler_yields_the_cpu_while_it_gathers(
    scheduler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each gathering tick gives the CPU to any other runnable thread first (gRPC reads the
    socket on its own poller thread); a session back alone does not gather, so does not yield."""
    yields: list[int] = []
    monkeypatch.setattr("service.engine.batch_window._yield_cpu", lambda: yields.append(1))
    runner = FakeRunner()
    s = scheduler(runner)
    await asyncio.wait_for(s.submit([(Owner(), feed(1)), (Owner(), feed(2))]).future, 5)
    assert len(yields) == 2  # two quiet ticks: no step of many rows before
    await asyncio.wait_for(s.submit([(Owner(), feed(1))]).future, 5)
    assert len(yields) == 2 + 4  # four after a step of many rows
    await asyncio.wait_for(s.submit([(Owner(), feed(1))]).future, 5)
    assert len(yields) == 6  # the session that stepped alone is back alone: no gathering


async def test_a_generation_s_first_step_runs_on_the_runner_thread(
    scheduler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step with a generation still waiting for its first token leaves the loop free, so
    calls arriving together join the next step instead of one step each; after that a lone
    generation steps inline."""
    monkeypatch.setattr("service.engine.step_scheduler._one_cpu", lambda: True)
    runner = FakeRunner()
    s = scheduler(runner)
    gen = Generation(FakeLease(slot=4), SamplingParams(max_tokens=3), ByteTokenizer())  # type: ignore[arg-type]
    s.start_generation(gen)
    await asyncio.wait_for(gen.retired, 5)
    assert runner.batches == [[4], [4], [4]]
    main = threading.current_thread()
    assert [t is main for t in runner.threads] == [False, True, True]


@pytest.mark.parametrize(
    ("one_cpu", "inline_max_rows", "device"),
    [(True, 1, "cpu"), (False, 1, "cpu"), (True, 0, "cpu"), (True, 1, "meta")],
)
async def test_on_one_cpu_every_one_input_batch_runs_on_the_loop_thread(
    scheduler: Any,
    monkeypatch: pytest.MonkeyPatch,
    one_cpu: bool,
    inline_max_rows: int,
    device: str,
) -> None:
    """On one CPU the runner thread overlaps nothing: batches of one-input rows run inline
    (chunks still go to the thread); inline_max_rows 0 still means never, and a pool on an
    accelerator (here the `meta` device standing in for one) keeps its thread, which overlaps
    the loop's work with the wait for the device."""
    monkeypatch.setattr("service.engine.step_scheduler._one_cpu", lambda: one_cpu)
    runner = FakeRunner(device)
    s = scheduler(runner, inline_max_rows=inline_max_rows)
    await asyncio.wait_for(s.submit([(Owner(), feed(i)) for i in range(4)]).future, 5)
    await asyncio.wait_for(s.submit([(Owner(), feed(9, tokens=3))]).future, 5)
    on_loop = [t is threading.current_thread() for t in runner.threads]
    assert on_loop == [one_cpu and inline_max_rows > 0 and device == "cpu", False]


@pytest.mark.parametrize(("one_cpu", "inline_max_rows"), [(True, 1), (False, 1), (True, 0)])
async def test_on_one_cpu_generation_steps_run_inline_once_each_has_its_first_token(
    scheduler: Any, monkeypatch: pytest.MonkeyPatch, one_cpu: bool, inline_max_rows: int
) -> None:
    """The window waits for the generations' consumers to take each step's tokens before the
    next step, so an inline step no longer sends them in bursts: on one CPU, steps of several
    generations run on the loop thread once none waits for its first token (a step with a new
    generation still goes to the thread, leaving the loop free to take in the calls arriving
    with it). Elsewhere only a lone row runs inline; inline_max_rows 0 means never."""
    monkeypatch.setattr("service.engine.step_scheduler._one_cpu", lambda: one_cpu)
    runner = FakeRunner()
    s = scheduler(runner, inline_max_rows=inline_max_rows)
    gens = [
        Generation(FakeLease(slot=slot), SamplingParams(max_tokens=3), ByteTokenizer())  # type: ignore[arg-type]
        for slot in (7, 8)
    ]
    taken: list[list[int]] = [[], []]

    async def consume(i: int) -> None:
        while len(taken[i]) < 3:
            token = await gens[i].tokens.get()
            assert not isinstance(token, BaseException)
            taken[i].append(token.token_id)

    for gen in gens:
        s.start_generation(gen)
    await asyncio.wait_for(asyncio.gather(*(consume(i) for i in range(2))), 5)
    await asyncio.wait_for(asyncio.gather(*(g.retired for g in gens)), 5)
    assert runner.batches == [[7, 8]] * 3
    main = threading.current_thread()
    inline = one_cpu and inline_max_rows > 0
    assert [t is main for t in runner.threads] == [False, inline, inline]


async def test_generations_stay_in_the_batch_until_they_finish(scheduler: Any) -> None:
    runner = FakeRunner()
    s = scheduler(runner)
    lease = FakeLease(slot=7)
    gen = Generation(lease, SamplingParams(max_tokens=3), ByteTokenizer())  # type: ignore[arg-type]
    s.start_generation(gen)
    beside = s.submit([(Owner(), feed(2))])  # a feed runs in the same steps as the generation
    tokens = [await asyncio.wait_for(gen.tokens.get(), 5) for _ in range(3)]
    await asyncio.wait_for(beside.future, 5)
    await asyncio.wait_for(gen.retired, 5)
    assert [t.token_id for t in tokens] == [107, 107, 107]  # type: ignore[union-attr]
    assert [t.position for t in tokens] == [1, 2, 3]  # type: ignore[union-attr]
    assert tokens[-1].finish_reason == FINISH_MAX_TOKENS  # type: ignore[union-attr]
    assert runner.batches == [[7, 2], [7], [7]]  # generation rows first, in every step
    steps = len(runner.batches)
    await asyncio.wait_for(s.submit([(Owner(), feed(1))]).future, 5)
    assert runner.batches[steps:] == [[1]]  # retired: no longer in the batch


async def test_a_generation_s_next_row_carries_the_head_output_its_last_step_kept(
    scheduler: Any,
) -> None:
    """The runner samples a generate row from `Row.head` when it has one instead of running the
    head again: each settled step must hand each generation its row's output."""
    runner = FakeRunner()
    s = scheduler(runner)
    gen = Generation(FakeLease(slot=7), SamplingParams(max_tokens=3), ByteTokenizer())  # type: ignore[arg-type]
    s.start_generation(gen)
    for _ in range(3):
        await asyncio.wait_for(gen.tokens.get(), 5)
    await asyncio.wait_for(gen.retired, 5)
    assert len(runner.heads) == 3
    assert runner.heads[0] == [None]  # the first row: nothing kept yet, the runner computes it
    for step in (1, 2):  # then the row at index 0 of the step before
        ((kept, row),) = runner.heads[step]  # type: ignore[misc]
        assert kept is runner.outputs[step - 1] and row == 0


async def test_a_cancelled_generation_is_retired_before_the_next_step(scheduler: Any) -> None:
    runner = FakeRunner()
    s = scheduler(runner)
    lease = FakeLease(slot=4)
    gen = Generation(lease, SamplingParams(max_tokens=1000), ByteTokenizer())  # type: ignore[arg-type]
    s.start_generation(gen)
    await asyncio.wait_for(gen.tokens.get(), 5)
    gen.cancelled = True
    await asyncio.wait_for(gen.retired, 5)
    consumed = lease.position
    await asyncio.wait_for(s.submit([(Owner(), feed(1))]).future, 5)
    assert runner.batches[-1] == [1] and lease.position == consumed


async def test_a_failed_step_fails_its_rows_and_the_next_step_runs(scheduler: Any) -> None:
    runner = FakeRunner()
    s = scheduler(runner)
    runner.fail = RuntimeError("boom")
    owner = Owner()
    lease = FakeLease(slot=6)
    gen = Generation(lease, SamplingParams(max_tokens=5), ByteTokenizer())  # type: ignore[arg-type]
    s.start_generation(gen)
    failed = s.submit([(owner, feed(1))])
    (outcome,) = await asyncio.wait_for(failed.future, 5)
    assert isinstance(outcome, RuntimeError)
    # Handed out without its traceback (logged when it was raised), whose frames hold the
    # step's rows: a reference cycle per failed step.
    assert outcome.__traceback__ is None
    assert isinstance(await asyncio.wait_for(gen.tokens.get(), 5), RuntimeError)
    await asyncio.wait_for(gen.retired, 5)
    assert owner.advances == [] and lease.advances == []  # nothing counted as consumed
    (ok,) = await asyncio.wait_for(s.submit([(owner, feed(2))]).future, 5)
    assert isinstance(ok, RowResult) and ok.position == 1


async def test_a_full_queue_refuses_and_a_stopped_scheduler_fails_what_is_queued(
    scheduler: Any,
) -> None:
    runner = FakeRunner()
    s = scheduler(runner, max_queue=2)
    # The message says what is queued and what was asked (it gave the limit as "pending"), and
    # that more rows than the queue ever takes are no use retrying.
    with pytest.raises(ResourceExhausted, match="0 rows pending and 3 more asked, at most 2; more"):
        s.submit([(Owner(), feed(i)) for i in range(3)])
    queued = s.submit([(Owner(), feed(0)), (Owner(), feed(1))])
    await s.stop()
    outcomes = await asyncio.wait_for(queued.future, 5)
    assert all(isinstance(o, Unavailable) for o in outcomes) and runner.batches == []
    with pytest.raises(Unavailable):
        s.submit([(Owner(), feed(0))])
    lease = FakeLease(slot=0)
    with pytest.raises(Unavailable):
        s.start_generation(Generation(lease, SamplingParams(), ByteTokenizer()))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tokens", "inline_max_rows", "on_loop_thread"),
    [(1, 1, True), (5, 1, False), (1, 0, False)],
    ids=["lone-token-inline", "chunk-on-runner-thread", "inline-off"],
)
async def test_which_thread_runs_the_step(
    scheduler: Any, tokens: int, inline_max_rows: int, on_loop_thread: bool
) -> None:
    """A lone one-input row runs on the event-loop thread (the handoff costs more than the
    step); chunks, and everything when inline_max_rows is 0, run on the runner thread."""
    runner = FakeRunner()
    s = scheduler(runner, inline_max_rows=inline_max_rows)
    await asyncio.wait_for(s.submit([(Owner(), feed(3, tokens=tokens))]).future, 5)
    assert len(runner.threads) == 1
    assert (runner.threads[0] is threading.current_thread()) == on_loop_thread


class BlockingRunner(FakeRunner):
    """A FakeRunner whose steps wait until `go` is set (it runs on the runner thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.entered = threading.Event()

    def execute(self, batch: StepBatch) -> StepOutput:
        self.entered.set()
        assert self.go.wait(10), "the test never let the step finish"
        return super().execute(batch)


async def test_a_group_withdrawn_before_its_step_never_runs(scheduler: Any) -> None:
    """A cancelled feed whose row is still queued is taken back (its session is untouched);
    one whose row is already in the running step cannot be."""
    runner = BlockingRunner()
    s = scheduler(runner, inline_max_rows=0)
    running_owner, queued_owner = Owner(), Owner()
    running = s.submit([(running_owner, feed(1))])
    assert await asyncio.to_thread(runner.entered.wait, 5)  # row 1 is in the step now
    queued = s.submit([(queued_owner, feed(2))])
    assert queued.withdraw() and queued.future.cancelled()
    assert not running.withdraw()  # too late: it is being computed
    runner.go.set()
    (result,) = await asyncio.wait_for(running.future, 5)
    assert isinstance(result, RowResult) and running_owner.advances == [1]
    await asyncio.wait_for(s.submit([(Owner(), feed(3))]).future, 5)
    assert runner.batches == [[1], [3]]  # slot 2's row never ran
    assert queued_owner.advances == []


class Journal:
    """A commit hook: records each step's records as one group, or refuses when `full`."""

    def __init__(self) -> None:
        self.groups: list[list[bytes]] = []
        self.full = False

    def commit(self, records: list[bytes]) -> int:
        if self.full:
            raise JournalUnavailable("the disk is full")
        self.groups.append(records)
        return 7  # the segment


async def test_each_step_is_committed_once_before_its_rows_count(scheduler: Any) -> None:
    runner, journal = FakeRunner(), Journal()
    s = scheduler(runner, commit=journal.commit)
    owners = [Owner(), Owner(position=5)]
    group = s.submit([(owners[0], feed(1)), (owners[1], feed(2, tokens=3))])
    await asyncio.wait_for(group.future, 5)
    assert journal.groups == [[b"1@0", b"2@5"]]  # one write for the step, before advance
    assert [o.segments for o in owners] == [[7], [7]]


async def test_a_step_that_cannot_be_committed_is_undone_and_refused(scheduler: Any) -> None:
    runner, journal = FakeRunner(), Journal()
    s = scheduler(runner, commit=journal.commit)
    journal.full = True
    owner = Owner()
    rng = SessionRng.seeded(3)
    expected_next = SessionRng.seeded(3).uniform()
    lease = FakeLease(slot=6)
    lease.session.rng = rng
    gen = Generation(lease, SamplingParams(temperature=1.0, max_tokens=5), ByteTokenizer())  # type: ignore[arg-type]
    s.start_generation(gen)
    (outcome,) = await asyncio.wait_for(s.submit([(owner, feed(1))]).future, 5)
    assert isinstance(outcome, JournalUnavailable)
    assert outcome.__traceback__ is None  # as a failed step's (above)
    assert isinstance(await asyncio.wait_for(gen.tokens.get(), 5), JournalUnavailable)
    await asyncio.wait_for(gen.retired, 5)
    assert len(runner.undone) == 1  # the step's state was put back
    assert owner.advances == [] and lease.advances == []  # positions untouched
    assert rng.uniform() == expected_next  # the draw the step took was given back
    journal.full = False
    (ok,) = await asyncio.wait_for(s.submit([(owner, feed(1))]).future, 5)
    assert isinstance(ok, RowResult) and ok.position == 1


async def test_generate_calls_that_keep_coming_join_steps_without_holding_them(
    scheduler: Any,
) -> None:
    """A running generation, then a new Generate call on every tick: a window takes in
    GENERATION_WINDOW_ARRIVALS of them at most and steps (not one per step, and not all after
    the last one), and the running generation advances while they keep coming."""
    runner = FakeRunner()
    s = scheduler(runner, max_batch_size=256)
    running = Generation(FakeLease(slot=0), SamplingParams(max_tokens=1000), ByteTokenizer())  # type: ignore[arg-type]
    s.start_generation(running)
    await asyncio.wait_for(running.tokens.get(), 5)
    calls = 100
    for i in range(1, calls + 1):
        gen = Generation(FakeLease(slot=i), SamplingParams(max_tokens=1), ByteTokenizer())  # type: ignore[arg-type]
        s.start_generation(gen)
        await asyncio.sleep(0)
    await until(
        lambda: {slot for b in runner.batches for slot in b}.issuperset(range(1, calls + 1)),
        60,
        "every call to have had its token",
    )
    running.cancelled = True
    await asyncio.wait_for(running.retired, 60)
    joined = [len(b) - 1 for b in runner.batches if len(b) > 1]  # new calls in each step
    assert sum(joined) == calls  # each call's one token, in some step
    # The window open when the calls began closed after taking in GENERATION_WINDOW_ARRIVALS
    # (one more may have come in with the tick it opened on), while calls kept coming (the
    # step's rows are the generations there when it closed); those that arrived while that
    # step ran joined the next one together.
    assert 0 < joined[0] <= GENERATION_WINDOW_ARRIVALS + 1
    assert all(0 in b for b in runner.batches)  # the running generation is in every step

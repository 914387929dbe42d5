"""Feeding sessions: input into a session's state (generation is `session_generator`).

Each feed holds its session's lease (`session_lease`), is validated into a tensor, goes to its
version's step scheduler as one row, and comes back as a `FeedOutcome` with the position the
step left. A Stream message's feeds go to each scheduler as one group: sessions already in
memory are leased and queued with no await per feed; the rest (spilled, on a version still to
load, or waiting their turn in a line) take the full path beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from service.engine.feed import Feed, FeedOutcome, PredictionOptions, check_request_id
from service.engine.model_input import ModelInput, to_tensor
from service.engine.reply_size import reply_bytes
from service.engine.row_group import RowGroup
from service.engine.served_version import ServedVersion, VersionObserver
from service.engine.session_lease import Lease, SessionLeases
from service.engine.session_line import Line
from service.errors import Internal, InvalidArgument, PositionMismatch, SeqServeError
from service.runtime.step_batch import Row, RowResult
from service.settings import EngineSettings


class SessionFeeder:
    def __init__(
        self,
        leases: SessionLeases,
        limits: EngineSettings,
        max_reply_bytes: int,
        observer: VersionObserver,
    ) -> None:
        self._leases = leases
        self._max_reply = max_reply_bytes  # 0: no limit
        self._max_chunk = limits.max_chunk_tokens
        self._default_top_k = limits.default_top_k
        self._observer = observer

    # ---- one feed ------------------------------------------------------------------------

    async def feed(self, feed: Feed, line: Line | None = None) -> FeedOutcome:
        started = time.perf_counter()
        async with self._leases.hold(feed.session_id, line) as lease:
            outcome = await self._apply(lease, feed)
        self._observed(lease, started)
        return outcome

    async def _apply(self, lease: Lease, feed: Feed) -> FeedOutcome:
        """Feed a leased, ready session: apply `feed`, or answer a retry of its last request
        with the original reply."""
        retried = _retried_feed(lease, feed)
        if retried is not None:
            return retried
        before = lease.session.position
        lease.request_id = feed.request_id
        inputs = self.inputs(lease.served, feed.input)
        outcome = await self.run(lease, inputs, feed.options, remember_as=feed.request_id)
        lease.remember(feed.request_id, before, outcome)
        return outcome

    def _observed(self, lease: Lease, started: float) -> None:
        served = lease.served
        self._observer.on_request(served.name, str(served.version), time.perf_counter() - started)

    async def run(
        self,
        lease: Lease,
        inputs: Tensor,
        options: PredictionOptions | None = None,
        *,
        remember_as: str | None = None,
        if_applied_late: Callable[[], None] | None = None,
    ) -> FeedOutcome:
        """Feed validated `inputs` to a leased, ready session. `remember_as`: the feed's
        request id ("" for none), remembered as the session's last request even if this call is
        cancelled too late (None: the caller remembers nothing, as a generation's prompt);
        `if_applied_late`: called, in that case, once the step has applied the feed."""
        served = lease.served
        group = served.scheduler.submit([(lease, self._row(lease, inputs, options))])
        lease.in_flight = group.future
        try:
            (result,) = await asyncio.shield(group.future)
        except asyncio.CancelledError:
            # Cancelled before the row went into a step: withdrawn, the session is untouched.
            # Too late: the step may be writing the slot now, and the lease is let go only once
            # it settles (the feed is consumed; the position says so).
            if not group.withdraw():
                if remember_as is not None:
                    _remember_late(group, [(lease, remember_as)])
                if if_applied_late is not None:
                    then = if_applied_late
                    _when_applied(group, lambda _row, _result: then())
            raise
        return _outcome(lease, result)

    def inputs(self, served: ServedVersion, inp: ModelInput) -> Tensor:
        """Validate `inp` for `served`'s model: the tensor it feeds, or InvalidArgument."""
        return to_tensor(inp, served.name, served.config, served.tokenizer, self._max_chunk)

    def _row(self, lease: Lease, inputs: Tensor, options: PredictionOptions | None) -> Row:
        opts = options or PredictionOptions()
        top_k = opts.top_k or self._default_top_k
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {opts.top_k}")
        served = lease.served
        if self._max_reply:
            size = reply_bytes(
                served.config, served.tokenizer, top_k, int(inputs.shape[0]), opts.per_position
            )
            if size > self._max_reply:
                raise InvalidArgument(
                    f"the reply could take up to {size} bytes, over the limit of "
                    f"{self._max_reply} (SEQSERVE_SERVER__MAX_MESSAGE_BYTES); ask for a smaller "
                    "top_k, per_position on shorter chunks, or send smaller chunks"
                )
        assert lease.session.slot is not None
        return Row(
            slot=lease.session.slot, inputs=inputs, top_k=top_k, per_position=opts.per_position
        )

    # ---- many feeds (one Stream message) ---------------------------------------------------

    async def feed_many(
        self, feeds: Sequence[Feed], line: Line | None = None
    ) -> list[FeedOutcome | SeqServeError]:
        """Each feed's outcome, or the error that refused that feed alone. Leases are taken in
        order before anything awaits, so a line keeps its order."""
        started = time.perf_counter()
        outcomes: list[FeedOutcome | SeqServeError | None] = [None] * len(feeds)
        batches: dict[tuple[str, int], tuple[ServedVersion, list[tuple[int, Lease, Row]]]] = {}
        slow: list[tuple[int, Lease]] = []
        for i, feed in enumerate(feeds):
            try:
                lease = self._leases.take(feed.session_id, line)
            except SeqServeError as exc:
                outcomes[i] = exc.detached()
                continue
            served = self._leases.ready_now(lease)
            if served is None:  # needs its turn, a load or a restore: the full path
                slow.append((i, lease))
                continue
            try:
                retried = _retried_feed(lease, feed)
                if retried is not None:
                    outcomes[i] = retried
                    self._leases.release(lease)
                    continue
                row = self._row(lease, self.inputs(served, feed.input), feed.options)
                lease.request_id = feed.request_id
            except SeqServeError as exc:
                outcomes[i] = exc.detached()
                self._leases.release(lease)
                continue
            batches.setdefault((served.name, served.version), (served, []))[1].append(
                (i, lease, row)
            )
        groups: list[tuple[ServedVersion, list[tuple[int, Lease, Row]], RowGroup]] = []
        for served, items in batches.values():
            leased = [lease for _, lease, _ in items]
            try:
                group = served.scheduler.submit([(lease, row) for _, lease, row in items])
            except SeqServeError as exc:
                for i, lease, _ in items:
                    outcomes[i] = exc.detached()
                    self._leases.release(lease)
                continue
            # Each applied feed is its session's last request as its step settles, before its
            # lease goes, and only then: letting go may write the session's periodic
            # checkpoint, which records that request for its retry, and lets the next message
            # of a Stream step the session before this call resumes (remembered then, it was
            # recorded over that later request). Also if this call is cancelled.
            _remember_late(group, [(lease, feeds[i].request_id) for i, lease, _ in items])
            # Let go the moment the rows have run, not when this call returns: slow feeds
            # below may be waiting for exactly these slots.
            self._leases.release_after(leased, group.future)
            groups.append((served, items, group))
        slow_tasks = []
        for i, lease in slow:
            task = asyncio.ensure_future(self._feed_leased(lease, feeds[i]))
            # Released by the task's end, not only its `finally`: a task cancelled before it
            # ever ran (the caller went away in the same tick) still lets its lease go.
            task.add_done_callback(self._releaser(lease))
            slow_tasks.append(task)
        # No gather (a future and a callback) for a message with no slow feeds, the usual case.
        slow_work = asyncio.gather(*slow_tasks, return_exceptions=True) if slow_tasks else None
        try:
            for served, items, group in groups:
                results = await asyncio.shield(group.future)
                elapsed = time.perf_counter() - started
                answered = 0
                for (i, lease, _), result in zip(items, results, strict=True):
                    try:
                        outcome = _outcome(lease, result)
                    except BaseException as exc:
                        outcomes[i] = _as_error(exc)
                        continue
                    outcomes[i] = outcome  # remembered for its retry as it settled
                    answered += 1
                if answered:  # one observation for the message's feeds: they took as long
                    self._observer.on_request(served.name, str(served.version), elapsed, answered)
            for (i, _), slow_outcome in zip(
                slow, await slow_work if slow_work else (), strict=True
            ):
                outcomes[i] = (
                    _as_error(slow_outcome)
                    if isinstance(slow_outcome, BaseException)
                    else slow_outcome
                )
        except asyncio.CancelledError:
            for _, _, group in groups:
                # What has not gone into a step yet never will; what has is applied all the
                # same, and remembered for its retry once the step settles (`_remember_late`).
                group.withdraw()
            if slow_work is not None:
                slow_work.cancel()
            raise
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    def _releaser(self, lease: Lease) -> Callable[[asyncio.Future[FeedOutcome]], None]:
        def release(_done: asyncio.Future[FeedOutcome]) -> None:
            self._leases.release(lease)

        return release

    async def _feed_leased(self, lease: Lease, feed: Feed) -> FeedOutcome:
        started = time.perf_counter()
        try:
            await self._leases.ready(lease)
            outcome = await self._apply(lease, feed)
        finally:
            self._leases.release(lease)
        self._observed(lease, started)
        return outcome


def _retried_feed(lease: Lease, feed: Feed) -> FeedOutcome | None:
    """The original reply when `feed` retries the session's last request (nothing is applied
    again); None when it applies; PositionMismatch when it does neither."""
    check_request_id(feed.request_id)
    applied = lease.precondition(feed.expected_position, feed.request_id)
    if applied is None:
        return None
    if not isinstance(applied.reply, FeedOutcome):  # that id named a generation
        raise not_a_retry(lease, feed.expected_position)
    if applied.reply.tokenizer is None:  # read back from a checkpoint
        applied.reply.tokenizer = lease.served.tokenizer
    return applied.reply


def _remember_late(group: RowGroup, rows: list[tuple[Lease, str]]) -> None:
    """When the step settles, each applied feed is remembered as its session's last request
    (one without a request id as such: no retry names it), also if its caller was cancelled
    after its row went into the step (the client or a proxy cancelled the call, the server
    stopped it), so that its retry gets the original reply instead of a position mismatch.
    Not if the session moved on since."""

    def remember(row: int, result: RowResult) -> None:
        lease, request_id = rows[row]
        with contextlib.suppress(Exception):
            outcome = _outcome(lease, result)
            if lease.session.position == outcome.position:  # nothing applied since
                lease.remember(request_id, outcome.position - result.consumed, outcome)

    _when_applied(group, remember)


def _when_applied(group: RowGroup, then: Callable[[int, RowResult], None]) -> None:
    """`then(row, result)` for each of the group's rows its step applied, once it settles."""

    def settled(future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        for row, result in enumerate(future.result()):
            if not isinstance(result, BaseException):
                then(row, result)

    if group.future.done():  # stepped already (a lone row steps in `submit`): at once
        settled(group.future)
    else:
        group.future.add_done_callback(settled)


def not_a_retry(lease: Lease, expected: int | None) -> PositionMismatch:
    position = lease.session.position
    return PositionMismatch(
        f"session {lease.session.session_id!r} is at position {position}, not {expected} "
        "(its last request was of another kind)",
        position,
    )


def _outcome(lease: Lease, result: RowResult | BaseException) -> FeedOutcome:
    if isinstance(result, BaseException):
        raise result
    assert result.prediction is not None
    return FeedOutcome(
        result.position, result.prediction, result.per_position or (), lease.served.tokenizer
    )


def _as_error(exc: BaseException) -> SeqServeError:
    """A feed's failure as the error it reports (a bug becomes INTERNAL), kept as its outcome
    (`SeqServeError.detached`)."""
    if isinstance(exc, SeqServeError):
        return exc.detached()
    internal = Internal("step failed")
    internal.__cause__ = exc
    return internal

"""Raw observations of a load test, appended as they happen.

Times are `time.perf_counter()` seconds. Everything inside the measured window is kept (compact
`array`s, so an hour at tens of thousands of tokens/s stays in memory); the report summarises
it afterwards. Errors are counted by the operation that failed and its gRPC status name.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field

LOAD_OPERATIONS = frozenset({"stream", "generate", "step", "feed"})  # the measured calls


@dataclass
class Samples:
    """Paired arrays: when each observation completed, and its value in seconds."""

    at: array[float] = field(default_factory=lambda: array("d"))
    seconds: array[float] = field(default_factory=lambda: array("d"))

    def add(self, at: float, seconds: float) -> None:
        self.at.append(at)
        self.seconds.append(seconds)

    def __len__(self) -> int:
        return len(self.seconds)


class LoadRecorder:
    """Until `open_window` only errors are counted (set-up happens before the window)."""

    def __init__(self) -> None:
        self.window_start = float("inf")
        self.window_end = float("inf")
        self.step_latency = Samples()  # feed items: send → reply
        self.time_to_first_token = Samples()  # generations: send → first token
        self.inter_token = Samples()  # generations: gap between consecutive tokens
        self.tokens_in = Samples()  # `seconds` holds the count fed at `at`
        self.tokens_in_total = 0
        self.tokens_generated = array("d")  # one timestamp per generated token
        self.messages = array("d")  # one timestamp per message (frame or Generate call) sent
        self.items = 0  # stream items sent in the window
        self.generations = 0  # generations that ran to their finish reason in the window
        self.errors: Counter[tuple[str, str]] = Counter()  # (operation, code) → count
        self.error_at = array("d")  # timestamps of errors in the window
        self.error_examples: dict[str, str] = {}  # code → first message seen
        # Open loop only, each counted by its arrival (intended send) time:
        self.arrivals = 0  # requests due in the window
        self.send_lag = Samples()  # sent: actual send − arrival (at = arrival)
        self.late = 0  # sent more than the late threshold after arrival
        self.dropped = array("d")  # arrival times of requests never sent

    def open_window(self, start: float, seconds: float) -> None:
        assert seconds > 0, "the measured window must not be empty"
        self.window_start, self.window_end = start, start + seconds

    def in_window(self, at: float) -> bool:
        return self.window_start <= at < self.window_end

    def close(self, at: float) -> None:
        """The run stopped at `at`: the window ends there if it had not already."""
        self.window_end = max(self.window_start + 1e-9, min(self.window_end, at))

    @property
    def window_seconds(self) -> float:
        return self.window_end - self.window_start

    # ---- observations ------------------------------------------------------------------------

    def message_sent(self, at: float, items: int) -> None:
        if self.in_window(at):
            self.messages.append(at)
            self.items += items

    def arrived(self, intended: float) -> None:
        """An open-loop request became due at `intended`."""
        if self.in_window(intended):
            self.arrivals += 1

    def started(self, intended: float, at: float, late: bool) -> None:
        """An open-loop request due at `intended` was sent at `at`."""
        if self.in_window(intended):
            self.send_lag.add(intended, at - intended)
            self.late += late

    def drop(self, intended: float) -> None:
        """An open-loop request due at `intended` was never sent (no session came free)."""
        if self.in_window(intended):
            self.dropped.append(intended)

    def fed(self, sent_at: float, at: float, tokens: int) -> None:
        """A feed item of `tokens` inputs was answered at `at`."""
        if self.in_window(at):
            self.step_latency.add(at, at - sent_at)
            self.tokens_in.add(at, float(tokens))
            self.tokens_in_total += tokens

    def prompt_fed(self, at: float, tokens: int) -> None:
        """A generation's prompt was consumed (counted when its first token arrives)."""
        if self.in_window(at):
            self.tokens_in.add(at, float(tokens))
            self.tokens_in_total += tokens

    def token(self, previous_at: float, at: float, first: bool) -> None:
        """A generated token arrived at `at`; `previous_at` is the send (first) or last token."""
        if self.in_window(at):
            (self.time_to_first_token if first else self.inter_token).add(at, at - previous_at)
            self.tokens_generated.append(at)

    def generation_finished(self, at: float) -> None:
        if self.in_window(at):
            self.generations += 1

    def error(self, operation: str, code: str, message: str, at: float) -> None:
        """Errors of the load itself count inside the window only, like every other sample;
        set-up and tear-down errors (create, history, close) always count."""
        in_window = self.in_window(at)
        if operation in LOAD_OPERATIONS and not in_window:
            return
        self.errors[(operation, code)] += 1
        self.error_examples.setdefault(code, message)
        if in_window:
            self.error_at.append(at)

    # ---- live view (progress display) ------------------------------------------------------

    def totals(self) -> tuple[int, int, int, int]:
        """(tokens in, tokens generated, step samples, errors) so far."""
        return (
            self.tokens_in_total,
            len(self.tokens_generated),
            len(self.step_latency),
            sum(self.errors.values()),
        )

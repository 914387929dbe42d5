"""A live line while the load test runs: phase, elapsed time, recent rates, latency, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import numpy as np

from service.loadtest.recorder import LoadRecorder


@dataclass(frozen=True)
class Progress:
    phase: str  # "warmup", "measuring" or "draining"
    elapsed: float  # seconds since the load started
    total: float  # warmup + duration
    sessions: int
    tokens_per_second: float  # since the previous snapshot
    messages_per_second: float
    step_p50: float | None  # over step samples since the previous snapshot
    step_p99: float | None
    tokens: int  # so far in the window
    errors: int  # so far, all operations


class ProgressTracker:
    """Turns the recorder's running totals into `Progress` snapshots (rates since the last)."""

    def __init__(self, recorder: LoadRecorder, sessions: int, started_at: float, total: float):
        self._rec = recorder
        self._sessions = sessions
        self._started = started_at
        self._total = total
        self._last_at = started_at
        self._last_tokens = 0
        self._last_messages = 0
        self._last_samples = 0

    def snapshot(self, now: float, phase: str) -> Progress:
        tokens_in, generated, samples, errors = self._rec.totals()
        tokens, messages = tokens_in + generated, len(self._rec.messages)
        dt = max(now - self._last_at, 1e-9)
        recent = np.frombuffer(self._rec.step_latency.seconds, dtype=np.float64)[
            self._last_samples : samples
        ]
        p50, p99 = np.percentile(recent, (50, 99)) if recent.size else (None, None)
        progress = Progress(
            phase=phase,
            elapsed=now - self._started,
            total=self._total,
            sessions=self._sessions,
            tokens_per_second=(tokens - self._last_tokens) / dt,
            messages_per_second=(messages - self._last_messages) / dt,
            step_p50=None if p50 is None else float(p50),
            step_p99=None if p99 is None else float(p99),
            tokens=tokens,
            errors=errors,
        )
        self._last_at, self._last_tokens = now, tokens
        self._last_messages, self._last_samples = messages, samples
        return progress


class ProgressPrinter:
    """Rewrites one line on a terminal; prints a line per update elsewhere (logs)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()

    def __call__(self, p: Progress) -> None:
        latency = (
            f"p50 {p.step_p50 * 1e3:6.2f} ms  p99 {p.step_p99 * 1e3:6.2f} ms"
            if p.step_p50 is not None and p.step_p99 is not None
            else "p50      - ms  p99      - ms"
        )
        line = (
            f"[{p.phase:<9} {p.elapsed:6.1f}/{p.total:g}s] sessions {p.sessions}  "
            f"{p.tokens_per_second:10,.0f} tok/s  {p.messages_per_second:9,.0f} msg/s  "
            f"{latency}  errors {p.errors:,}"
        )
        if self._tty:
            self._stream.write("\r\x1b[2K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

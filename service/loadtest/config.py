"""What a load test does: how many sessions, what each sends, for how long."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from service.client.target_address import check_target

MAX_RATE = 1_000_000.0  # open loop: arrivals a second, at most

GenerateVia = Literal["rpc", "stream"]


# The float fields' checks. NaN fails both. So does inf: an infinite duration or warmup never
# ends, an infinite ready timeout waits for ever for a target that does not answer, and the
# report's config (--json) would hold `Infinity`, which is not JSON.
def _at_least(value: float, low: float) -> bool:
    return value >= low and math.isfinite(value)


def _above(value: float, low: float) -> bool:
    return value > low and math.isfinite(value)


@dataclass(frozen=True)
class LoadConfig:
    """One load test. With `rate` 0 every session runs turns in a closed loop: send, wait for
    the answer, think, repeat. With `rate` > 0 the load is open loop: requests arrive as a
    Poisson process at `rate` per second, whatever the server's speed, and each takes an idle
    session (see `open_loop.py`). A turn either feeds `tokens_per_message` inputs or, with
    probability `generate_fraction`, feeds them as a prompt and generates up to `max_tokens`."""

    target: str  # host:port of the server; the only address the load test ever contacts
    model: str = "bytes-lstm"
    version: str = ""  # "" = what the server resolves by default (production alias, else latest)
    sessions: int = 16  # concurrent sessions created on the server, at least 1
    duration_seconds: float = 10.0  # measured window; workers stop sending when it ends
    warmup_seconds: float = 0.0  # run this long first without recording anything
    tokens_per_message: int = 1  # inputs (tokens or feature frames) per feed item
    think_ms: float = 0.0  # mean pause between a session's turns (uniform in ±50%)
    generate_fraction: float = 0.0  # probability that a turn generates instead of only feeding
    generate_via: GenerateVia = "rpc"  # `Generate` RPC, or a generate item on the Stream
    max_tokens: int = 32  # tokens per generation
    temperature: float = 1.0  # sampling temperature for generations (0 = greedy)
    multiplex: int = 1  # sessions per Stream; each tick sends one frame with one item each
    client_mux: bool = False  # each session awaits its own feeds on one SeqServeClient
    history: int = 0  # inputs fed to each session before the clock starts (long contexts)
    top_k: int = 0  # top-k of each prediction (0 = server default)
    invalid_sessions: int = 0  # extra sessions with ids the server never issued (error path)
    seed: int = 0  # makes the inputs, think times and turn choices reproducible
    drain_seconds: float = 5.0  # after the window, how long in-flight turns may take to finish
    ready_timeout_seconds: float = 10.0  # how long to wait for the server to accept calls
    rate: float = 0.0  # open loop: mean requests per second, Poisson arrivals (0 = closed loop)
    late_ms: float = 10.0  # open loop: a request sent this long after its arrival is late
    max_lag_seconds: float = 1.0  # open loop: not sent this long after its arrival → dropped

    @property
    def open_loop(self) -> bool:
        return self.rate > 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        check_target(self.target)
        checks: list[tuple[bool, str]] = [
            (bool(self.model), "model must be set"),
            (self.sessions >= 1, "sessions must be >= 1"),  # invalid sessions are extra ones
            (_above(self.duration_seconds, 0), "duration must be > 0 and finite"),
            (_at_least(self.warmup_seconds, 0), "warmup must be >= 0 and finite"),
            (self.tokens_per_message >= 1, "tokens per message must be >= 1"),
            (_at_least(self.think_ms, 0), "think time must be >= 0 and finite"),
            (0.0 <= self.generate_fraction <= 1.0, "generate fraction must be in [0, 1]"),
            (self.generate_via in ("rpc", "stream"), "generate-via must be rpc or stream"),
            (self.max_tokens >= 1, "max tokens must be >= 1"),
            (_at_least(self.temperature, 0), "temperature must be >= 0 and finite"),
            (self.multiplex >= 1, "multiplex must be >= 1"),
            (self.history >= 0, "history must be >= 0"),
            (self.top_k >= 0, "top-k must be >= 0"),
            (self.invalid_sessions >= 0, "invalid sessions must be >= 0"),
            (_at_least(self.drain_seconds, 0), "drain must be >= 0 and finite"),
            (
                _at_least(self.ready_timeout_seconds, 0),
                "ready timeout must be >= 0 and finite",
            ),
            # NaN fails both; an open loop cannot issue more (nor count more it fell behind on)
            (0 <= self.rate <= MAX_RATE, f"rate must be >= 0 and <= {MAX_RATE:,.0f} a second"),
            (_at_least(self.late_ms, 0), "late threshold must be >= 0 and finite"),
            (_above(self.max_lag_seconds, 0), "max lag must be > 0 and finite"),
        ]
        if self.client_mux:  # one app-style loop per session, feeding only
            checks += [
                (not self.open_loop, "--client-mux is a closed loop, not with --rate"),
                (self.multiplex == 1, "--client-mux groups feeds itself, not with --multiplex"),
                (self.generate_fraction == 0, "--client-mux feeds only, not with generations"),
            ]
        if self.open_loop:  # the closed loop's knobs mean nothing for arrivals at a set rate
            checks += [
                (self.think_ms == 0, "--think-ms applies to the closed loop, not with --rate"),
                (self.multiplex == 1, "--multiplex applies to the closed loop, not with --rate"),
                (
                    self.generate_via == "rpc",
                    "--generate-via stream applies to the closed loop, not with --rate",
                ),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

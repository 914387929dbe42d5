"""The token-bucket rule of the tokens-per-second quota, as pure arithmetic: the local buckets
(`quotas.py`) and the SQLite tier's (`sessions/sqlite_state.py`) apply it to their own stored
(level, time); Redis runs the same rule in its Lua script."""

from __future__ import annotations


def take(level: float, at: float, now: float, tokens: int, rate: float) -> tuple[float, float]:
    """A bucket last at `level` at time `at`, refilled at `rate` per second up to a second's
    worth, asked for `tokens` at `now` → (its new level, 0) when they are taken, or (its
    refilled level, the seconds to wait) when not. A request over a second's worth needs a full
    bucket and leaves it in debt, so the rate holds over time. A negative count gives tokens
    back (what a refused request was charged), never past a full bucket. A `now` before `at`
    (a clock stepped back, or another process's take that read its clock first and committed
    first) refills nothing: it never takes tokens away."""
    level = min(rate, level + max(0.0, now - at) * rate)
    if tokens < 0:
        return min(rate, level - tokens), 0.0
    needed = min(tokens, rate)
    if level < needed:
        return level, (needed - level) / rate + 0.01
    return level - tokens, 0.0

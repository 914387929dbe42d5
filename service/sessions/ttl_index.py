"""Which idle TTLs the live sessions hold, and the shortest of them: how far the expiry sweep
must walk the LRU order (a session used more recently than the shortest TTL cannot expire)."""

from __future__ import annotations

from collections import Counter


class TtlIndex:
    def __init__(self) -> None:
        self._counts: Counter[float] = Counter()  # TTL → sessions holding it
        self._shortest: float | None = None  # None: recounted when next asked

    def add(self, ttl: float) -> None:
        self._counts[ttl] += 1
        if self._shortest is not None and ttl < self._shortest:
            self._shortest = ttl

    def remove(self, ttl: float) -> None:
        left = self._counts[ttl] - 1
        if left > 0:
            self._counts[ttl] = left
            return
        del self._counts[ttl]
        if ttl == self._shortest:
            self._shortest = None

    def shortest(self) -> float:
        """The shortest TTL held (0 when none is)."""
        if self._shortest is None:
            if not self._counts:
                return 0.0
            self._shortest = min(self._counts)
        return self._shortest

"""The local spill tier's clean stops, so that no downtime after one counts toward a TTL.

A checkpoint not written again keeps its last use (a wall time) from before every later stop,
and the clean-stop marker tells only of the latest stop. So the spill directory keeps, in
`.downtimes`, the clean stops' downtimes ([stop, start] wall times) since the oldest
checkpoint's last use; `idle_since` takes them off a wall time's age. After a crash the stop
time is unknown: that downtime counts (earlier clean stops' still do not). A file that cannot
be read or written is logged, and its downtimes then count, as after a crash. A shared tier's
clock never stopped: it has none of this.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

DOWNTIMES = ".downtimes"


class CleanDowntimes:
    def __init__(self) -> None:
        # Oldest first; the end of each; the downtime from each on (one more, 0.0, at the end).
        self._downtimes: list[tuple[float, float]] = []
        self._ends: list[float] = []
        self._from: list[float] = [0.0]

    def note(
        self, directory: Path, stopped_at: float | None, now: float, last_uses: Iterable[float]
    ) -> None:
        """Read the downtimes kept in `directory`, add the one that ends `now` (the last stop
        was clean at `stopped_at`), and keep those some last use in `last_uses` (the records'
        last uses, or their files' writes) may precede: on disk too, for the next start."""
        path = directory / DOWNTIMES
        kept = _read(path)
        found = list(kept)
        if stopped_at is not None and stopped_at < now:
            found.append((stopped_at, now))
        oldest = min(last_uses, default=now)
        found = [(stop, start) for stop, start in found if start > oldest]
        if found != kept:
            _write(path, found)
        self._downtimes = found
        self._ends = [start for _, start in found]
        lengths = [start - stop for stop, start in reversed(found)]
        self._from = list(itertools.accumulate(lengths, initial=0.0))[::-1]

    def idle_since(self, last_used_wall: float, now: float) -> float:
        """Seconds the server was up from `last_used_wall` to `now` (wall times): the time
        between, less the downtime of every clean stop since."""
        i = bisect.bisect_right(self._ends, last_used_wall)  # the first stop ending later
        down = self._from[i]
        if i < len(self._downtimes):  # "used" while down (clocks differ): only the rest skipped
            down -= max(0.0, last_used_wall - self._downtimes[i][0])
        return max(0.0, now - last_used_wall - down)


def modified(path: Path) -> float:
    """A file's last write (wall time); +inf when it cannot be read."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")


def _read(path: Path) -> list[tuple[float, float]]:
    """The downtimes kept in `path` (none when there is no such file)."""
    try:
        return [(float(stop), float(start)) for stop, start in json.loads(path.read_text())]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable %s (their downtime counts toward TTLs): %s", path, exc)
        return []


def _write(path: Path, downtimes: list[tuple[float, float]]) -> None:
    """`downtimes` to `path`, whole and synced: a crash leaves the old file, or the new one
    (and perhaps a stray temporary file, replaced at the next write)."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(downtimes, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write %s (the downtime counts at the next start): %s", path, exc)

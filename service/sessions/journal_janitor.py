"""The journal's janitor: a thread that does the journal's slow file work off the event loop,
in the order it was handed over.

Its chores are a full segment's final fsync and close (a descriptor), and the deletion of a
segment nobody needs (a path: ~4-14 ms for a 64 MB one on this machine's disk). Deletions
queued together are handed to the journal as one batch, so one flush of the checkpoints covers
them all. An event handed over is set once everything before it is done (`settle`). Before
`start` and after `stop`, a chore is done at once by the caller.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from service.sessions.journal_segments import close_segment

log = logging.getLogger(__name__)

Chore = int | Path | threading.Event | None  # None: stop


class JournalJanitor:
    def __init__(self, delete: Callable[[list[Path]], None]) -> None:
        self._delete = delete  # deletes segments once the checkpoints are flushed
        self._chores: queue.SimpleQueue[Chore] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="journal-janitor")
        self._thread.daemon = True
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def hand(self, work: int | Path) -> None:
        """A full segment's descriptor to fsync and close, or a segment to delete: by the
        thread, in order, when it runs; here when it does not (before start, after stop)."""
        if self.running:
            self._chores.put(work)
        else:
            self._do(work)

    def settle(self) -> None:
        """Wait until the thread has done what it was handed (fsyncs, closes, deletions)."""
        if self.running:
            done = threading.Event()
            self._chores.put(done)
            done.wait(timeout=30)

    def stop(self) -> bool:
        """Stop the thread after everything handed to it; whether it is still busy (a slow
        disk?) after waiting 30 seconds."""
        if self._thread is None:
            return False
        self._chores.put(None)  # after everything handed to it
        self._thread.join(timeout=30)
        busy = self._thread.is_alive()
        if busy:
            log.error("journal janitor still busy at close (a slow disk?)")
        self._thread = None
        return busy

    def _do(self, work: int | Path) -> None:
        """A chore, done now. A segment is deleted only once the checkpoints are flushed."""
        if isinstance(work, int):
            close_segment(work)
        else:
            self._delete([work])

    def _loop(self) -> None:
        held: list[Chore] = []  # taken early, done next
        while True:
            work = held.pop() if held else self._chores.get()
            if work is None:
                return
            if isinstance(work, threading.Event):
                work.set()
                continue
            try:
                if isinstance(work, Path):  # with the deletions queued behind it: one flush
                    segments = [work]
                    while not self._chores.empty():
                        more = self._chores.get()
                        if not isinstance(more, Path):
                            held.append(more)
                            break
                        segments.append(more)
                    self._delete(segments)
                else:
                    self._do(work)
            except Exception:  # never let the thread die with chores still coming
                log.exception("journal janitor: %s failed", work)

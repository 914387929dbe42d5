"""Why sessions ended, kept across clean restarts without a journal (`durability = "shutdown"`).

With the journal, a late request for a closed or expired session learns which after any number
of restarts: the journal keeps the answers in its `ended` file (`sessions.ended_file`). Without
a journal nothing is written as sessions end; sessions survive a clean restart (a SIGTERM
writes them) but not a crash, and so do these answers: a clean stop, once every session is
written and none can end any more, writes the ends this process remembers (closed, expired,
moved; the newest 100,000, with their owners) to the same file, `journal/ended` in the state
directory (so a later start with the journal reads them too), and a start reads it.

A crash leaves the file the last clean stop wrote: the ends since then are lost (a late request
for those ids hears NOT_FOUND), never a session. The file's format, its damage (counted in
`seqserve_state_damaged_records_total{kind="journal"}`, never stopping a start) and its whole
writes (a temporary file, synced, renamed) are `EndedFile`'s. A disk that refuses it is logged;
the stop goes on.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from service.sessions.ended_file import Ended, EndedFile
from service.sessions.session_store import SessionStore

log = logging.getLogger(__name__)


class KeptEnds:
    def __init__(self, directory: Path, sessions: SessionStore, *, durable: bool) -> None:
        self._file = EndedFile(directory, durable=durable)
        self._sessions = sessions
        self._recalled = False  # `keep` writes only what a `recall` started from

    @property
    def damaged(self) -> int:
        """Lines of the file found damaged (at the start's read)."""
        return self._file.damaged

    async def recall(self) -> int:
        """At start, once the spill tier is open: the ends the last clean stop kept, each
        answered from now on (a session resumed from the tier is live: only its owner is
        noted). Returns how many."""
        kept = await asyncio.to_thread(self._file.read)
        for session_id, why, owner in kept:
            self._sessions.ended_earlier(session_id, why, owner)
        self._recalled = True
        return len(kept)

    async def keep(self) -> bool:
        """At a clean stop, once every session is written: what this process remembers of why
        sessions ended, for the next start. False when the disk refused it (logged). Nothing
        is written by a process whose start did not read the file (a start that failed before:
        the file, maybe another server's, is left as it is)."""
        if not self._recalled:
            return False
        ended = self._sessions.gone.remembered()
        return await asyncio.to_thread(self._write, ended)

    def _write(self, ended: list[Ended]) -> bool:
        directory = self._file.path.parent
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            log.error("could not create %s (%s): requests for the %d sessions that ended will "
                      "hear NOT_FOUND after the restart", directory, exc, len(ended))  # fmt: skip
            return False
        # Appends what `rewrite` could not put in place (a file the start could not read is
        # kept and appended to, never replaced): no later append would.
        return self._file.rewrite(ended) and self._file.carry(None)

"""The records the journal holds for sessions recovery could not load now (their version
missing from the store), kept across restarts in a segment of their own.

Recovery copies those sessions' records out of the segments it read into one held segment
after them (`hold`), so the segments read are trimmed as usual rather than kept, with all
after them, for as long as such a session lives. A held session's records go when its owner
closes it (`release`): the held segment is rewritten with the others' records, or given up
with the last of them. Each write replaces the segment whole (`write_whole`), so a crash finds
the old records or the new. At the next restart the held segment is read like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.sessions.journal_segments import segment_path, write_whole

log = logging.getLogger(__name__)


class HeldRecords:
    def __init__(self, directory: Path, durable: bool) -> None:
        self._directory = directory
        self._durable = durable  # synced where the journal promises a power loss
        self._records: dict[str, list[bytes]] = {}  # session → its records recovery holds
        self.seq = 0  # the segment holding them (0: none), never trimmed while they live

    def hold(self, seq: int, records: dict[str, list[bytes]]) -> bool:
        """Write `records` (per session) as segment `seq`; False (logged) when it cannot be
        written."""
        try:
            self._write(seq, records)
        except OSError as exc:
            log.error("could not copy the records of sessions held at recovery (%s): the "
                      "journal keeps every segment until they are closed", exc)  # fmt: skip
            return False
        self.seq = seq
        self._records = dict(records)
        return True

    def release(self, session_id: str) -> Path | None:
        """Drop a closed session's records: the held segment, when they were its last (no
        longer needed: the caller deletes it), else None. Raises OSError when the segment
        could not be rewritten without them (it still holds them)."""
        if self._records.pop(session_id, None) is None:
            return None
        if not self._records:
            path, self.seq = segment_path(self._directory, self.seq), 0
            return path
        self._write(self.seq, self._records)  # the others' records, in its place
        return None

    def _write(self, seq: int, records: dict[str, list[bytes]]) -> None:
        data = b"".join(b"".join(r) for r in records.values())
        write_whole(self._directory, seq, data, self._durable)

"""The state tier's two interfaces, each with two backends (DESIGN section 10).

- `Checkpoints`: each session's last checkpoint (a spill record). Local: `SpillTier`, one file
  per session in the state directory. Shared: `SharedCheckpoints` (Redis, or SQLite).
- `JournalLog`: every acknowledged step since each session's checkpoint. Local: `Journal`,
  append-only segment files. Shared: `SharedJournal`, a list (or rows) per session.

The engine sees only these; `wiring.py` picks the backends (`SESSIONS__STATE_URL` set: the
shared tier it names).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from service.sessions.ended_file import Ended
from service.sessions.journal_record import JournalRecord
from service.sessions.journal_scan import Unreadable
from service.sessions.spill_directory import TierScan
from service.sessions.spill_record import SpillRecord


class Checkpoints(Protocol):
    @property
    def directory(self) -> Path | str: ...  # where they are, for logs

    @property
    def bytes_used(self) -> int: ...

    def open(self) -> TierScan: ...

    def close(self) -> None: ...

    def sync(self) -> None: ...

    def mark_clean_stop(self, wall_time: float) -> None: ...

    def write(
        self,
        record: SpillRecord,
        *,
        durable: bool = False,
        first: bool = False,
        past_cap: bool = False,
    ) -> None: ...

    def read(self, session_id: str) -> SpillRecord: ...

    def delete(self, session_id: str) -> None: ...


class JournalLog(Protocol):
    @property
    def oldest(self) -> int: ...  # the oldest segment `open` read (0: none)

    @property
    def segment(self) -> int: ...  # the segment appends go to

    @property
    def failed_writes(self) -> int: ...

    @property
    def damaged_records(self) -> int: ...  # records `open` found damaged

    # Whether this replica's own disk refuses appends now (the last one failed), so steps
    # cannot be made durable here until `probe` finds it takes writes again. Always False for
    # a shared tier: its journal is every replica's, not judged by one.
    @property
    def refusing(self) -> bool: ...

    def probe(self) -> bool: ...  # while `refusing`: would an append succeed now (blocking)

    def writes_again(self) -> None: ...  # a probe succeeded: no longer `refusing`

    def open(self) -> Iterator[JournalRecord | Unreadable]: ...

    def ended_sessions(self) -> list[Ended]: ...  # ends kept past their END records

    def keep_ended(self, ended: list[Ended]) -> None: ...

    def start(self) -> None: ...

    def drop_before(self, seq: int) -> None: ...

    def close(self) -> None: ...

    def sync(self) -> None: ...

    def pin(self, seq: int) -> None: ...

    def unpin(self, seq: int) -> None: ...

    def append(self, records: list[bytes]) -> int: ...

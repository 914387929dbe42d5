"""A state tier several processes share: any of them can take a session over (DESIGN section 10).

Per session it keeps a checkpoint (a spill record), the journal records since that checkpoint,
and its holder with a fencing epoch. Two backends, one interface (`SharedState`):
- `RedisState` (`redis_state.py`): `SESSIONS__STATE_URL=redis://...`, for replicas on several
  machines;
- `SqliteState` (`sqlite_state.py`): a database file in the state directory, for the worker
  processes of `seqserve serve --workers N` on one box.

Every write of a session — a batch's journal records, a checkpoint (which also empties its
journal), its end — is checked against the epoch in the same atomic step that writes (a Lua
script; a SQLite transaction). A takeover raises the epoch, so the previous holder, however
alive, has every later write refused and answers UNAVAILABLE; no lock is held between writes,
so a frozen process keeps nothing from anyone. Keys expire by each session's TTL on the tier's
clock, refreshed by every write and every fork of the session (`keep_alive`), so a session whose
holder died still expires.

`SharedJournal` (`shared_journal.py`) and `SharedCheckpoints` (`shared_checkpoints.py`) give
the engine the journal and spill-tier interfaces of the local tier (`state_tier.py`) over either
backend; both work through the `SharedState` defined here, the backends' common base, with what
its methods take and return (`Write`, `Claimed`).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Literal

from service.errors import JournalUnavailable, SessionMoved
from service.sessions import spill_record, tier_records
from service.sessions.journal_record import JournalRecord
from service.sessions.spill_record import SpillRecord

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    """What the tier holds of a session, read in the same step that took it over."""

    epoch: int  # the reader's epoch from now on (0: the session does not exist)
    checkpoint: SpillRecord | None
    records: list[JournalRecord] = field(default_factory=list)
    ended: str = ""  # when it does not exist: why it ended ("" when it never did)
    ended_owner: str = ""  # and whose it was


@dataclass
class Write:
    """One session's share of a batch: its records, checked against `epoch`."""

    session_id: str
    epoch: int
    ttl_ms: int
    op: Literal["create", "step", "end"]
    records: list[bytes]  # for "end": [why]
    made_by: str = ""  # "create:<request id>": the tier remembers which session it made
    owner: str = ""  # the session's principal: the tier counts each principal's sessions


def replica_name() -> str:
    """This process's name as a holder: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class SharedState:
    """What both backends share: the moved set, failure counting and the errors."""

    setting = "SEQSERVE_SESSIONS__STATE_URL"

    def __init__(self, where: str, replica: str | None) -> None:
        self.where = where  # for logs and messages (no password)
        self.replica = replica or replica_name()
        # Sessions whose copy here is stale (a write refused: another holds them; or its
        # outcome unknown), until the copy goes (`SharedCheckpoints.delete`) or is taken back.
        self.moved: set[str] = set()
        self.failed_writes = 0
        self.damaged: dict[str, int] = {}  # session → damaged journal records found (`claimed`)
        self._failing = False

    # -- the backend's part ------------------------------------------------------------------

    def check(self) -> None:
        """At start-up: usable, configured not to lose sessions (raises StateTierUnusable)."""
        raise NotImplementedError

    def append(self, writes: list[Write]) -> list[str]:
        """All `writes` if every epoch holds, else none: the ids whose epoch did not."""
        raise NotImplementedError

    def checkpoint(
        self,
        session_id: str,
        epoch: int,
        ttl_ms: int,
        data: bytes,
        *,
        first: bool = False,
        made_by: str = "",
        owner: str = "",
    ) -> bool:
        """Replace the checkpoint and empty the journal, if `epoch` holds; with `first` (a
        fork's child, which no record made), make the session at `epoch` unless it exists,
        remembering `made_by`. `owner`: counted as the session's principal."""
        raise NotImplementedError

    def claim(self, session_id: str) -> Claimed:
        """Take the session over: raise its epoch, name this process its holder, read it."""
        raise NotImplementedError

    def peek(self, session_id: str) -> Claimed:
        """Read the session without taking it (epoch 1 when it exists, 0 when not)."""
        raise NotImplementedError

    def read_checkpoint(self, session_id: str) -> tuple[int, bytes | None]:
        """(the session's epoch, its checkpoint), read together."""
        raise NotImplementedError

    def epoch_of(self, session_id: str) -> int:
        """The session's current epoch (0: no such session)."""
        raise NotImplementedError

    def keep_alive(self, session_id: str, epoch: int, ttl_ms: int, owner: str = "") -> int:
        """The session's current epoch (0: no such session); when that is `epoch`, its TTL
        restarts as at a write. For a request that uses the session and writes nothing of it (a
        fork of it): without this a template only forked expires in the tier while its holder
        keeps it alive. `owner`: its principal, whose count of live sessions it stays in."""
        raise NotImplementedError

    def made(self, made_by: str) -> str:
        """The session a create or fork request (`made_by`) made, wherever ("" if none)."""
        raise NotImplementedError

    def purge_expired(self) -> int:
        """Delete sessions past their TTL on the tier's clock, whoever held them (Redis does it
        itself: key TTLs)."""
        return 0

    def owned(self, owner: str) -> set[str]:
        """The ids of the live sessions `owner` has in the tier, on every replica. Ids, not a
        count: a caller adds the sessions it made while the read ran, once whether the read
        saw them or not (`security.quotas`)."""
        raise NotImplementedError

    def take_tokens(self, owner: str, tokens: int, rate: float) -> float:
        """Take `tokens` from `owner`'s bucket in the tier (refilled at `rate`, holding a
        second's worth; see `security.quotas`): 0 when taken, else seconds until there are
        enough. Negative `tokens` give back a refused request's charge."""
        raise NotImplementedError

    # Each backend raises `self.unreachable(exc)` (JournalUnavailable) for its connection or
    # I/O errors, from every method above but `check`.

    def close(self) -> None:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------

    @staticmethod
    def ended(tombstone: str) -> Claimed:
        """A session that is gone: why it ended, and whose it was (tombstone "why\nowner")."""
        why, _, owner = tombstone.partition("\n")
        return Claimed(0, None, ended=why, ended_owner=owner)

    def claimed(
        self, session_id: str, epoch: int, checkpoint: bytes | None, records: list[bytes]
    ) -> Claimed:
        record = None
        if checkpoint is not None:
            data = bytes(checkpoint)
            if spill_record.newer(data):  # a rolling upgrade's, not damage: not ours to read
                raise tier_records.newer_checkpoint(session_id, spill_record.newer_owner(data))
            record = spill_record.decode(data, f"checkpoint of {session_id}")
        decoded, damaged = tier_records.read(session_id, records, record)
        if damaged:  # counted once a session, however often it is read
            if session_id not in self.damaged:
                self.damaged[session_id] = len(damaged)
                log.warning("state tier %s: session %s's journal holds %d damaged records",
                            self.where, session_id, len(damaged))  # fmt: skip
            raise tier_records.lost(session_id, record, decoded, damaged)
        return Claimed(epoch, record, decoded)

    def unreachable(self, exc: Exception, *, failed: bool = False) -> JournalUnavailable:
        """The answer to a call the tier did not take. `failed`: the tier answered with an
        error of its own (SQLite's: a full disk, an I/O error), which the answer quotes; else
        it could not be reached."""
        self.failed_writes += 1
        if not self._failing:
            self._failing = True
            log.error("state tier %s failing: %s", self.where, exc)
        why = f"failed ({exc})" if failed else "is unreachable"
        return JournalUnavailable(
            f"session state cannot be made durable: the state tier ({self.setting}) {why}; "
            "nothing was applied or changed, retry later"
        )

    def unsure(self, exc: Exception, session_ids: list[str]) -> JournalUnavailable:
        """A write the tier did not answer (it timed out, or the connection failed or broke):
        it may have applied it, or may still (a Redis that stalls runs what it has queued when
        it wakes; a connection reset after the script ran loses only the answer), so this
        replica no longer knows what the tier holds of `session_ids`. Each copy here is
        dropped at its next request (`moved`) and taken over again from the tier, whose epoch
        then fences the write should it land later: a retry with the same request id finds
        it applied (its reply) or applies it."""
        self.unreachable(exc)
        self.moved.update(session_ids)
        return JournalUnavailable(
            f"session state may not be durable: the state tier ({self.setting}) did not "
            "answer (it timed out, or the connection failed), so the step may or may not have "
            "been applied; retry with the same request id (a call sent without one may have "
            "taken effect: look before repeating it)"
        )

    def reachable(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("state tier reachable again after %d failed writes", self.failed_writes)

    def fenced(self, session_ids: list[str]) -> SessionMoved:
        self.moved.update(session_ids)
        error = SessionMoved(
            "the step was not applied: the session is held by another replica now (taken "
            "over); retry"
        )
        error.session_ids = tuple(session_ids)
        return error

"""Writing sessions' checkpoints to the state tier: a session's record as it stands (its header
and its slot's state), written, counted and timed.

A checkpoint keeps the session in memory (an idle checkpoint, a periodic one, a fork's first);
an eviction or a shutdown's write (`SessionResidency.spill`) writes the same record and then
frees the slot; a replay writes the one its journal rebuilt. Once a record is in the tier the
session's journal records up to it are no longer needed (`Durability.checkpointed`). Where a
session's state lives is `SessionResidency`'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from service.engine.checkpoint_header import header_of
from service.engine.durability import Durability
from service.engine.served_versions import ServedVersions
from service.errors import SeqServeError, SessionMoved
from service.runtime.state_pool import SlotSnapshot
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.spill_record import SpillHeader, SpillRecord
from service.sessions.state_tier import Checkpoints


class CheckpointWriter:
    def __init__(
        self,
        sessions: SessionStore,
        versions: ServedVersions,
        tier: Checkpoints,
        durability: Durability,
    ) -> None:
        self.sessions = sessions
        self.versions = versions
        self.tier = tier
        self.durability = durability
        # Records the tier took (checkpoints, evictions, replays' checkpoints), and the wall
        # time they took: the disk's price, for `seqserve_state_write*` (a slow disk shows).
        self.writes = 0
        self.write_seconds = 0.0
        self.write_failures = 0  # records the tier refused (a full, read-only, failing disk)

    def states(self, sessions: Sequence[Session]) -> dict[str, SlotSnapshot]:
        """The states of sessions in memory, by session id: each version's read together
        (`StatePool.snapshots`: one gather)."""
        by_version: dict[tuple[str, int], list[Session]] = {}
        for session in sessions:
            by_version.setdefault((session.model, session.version), []).append(session)
        states: dict[str, SlotSnapshot] = {}
        for (model, version), group in by_version.items():
            served = self.versions.find(model, version)
            assert served is not None
            slots = [s.slot for s in group]
            assert all(slot is not None for slot in slots), "only sessions in memory"
            snaps = served.pool.snapshots(slots)  # type: ignore[arg-type]
            states.update(zip((s.session_id for s in group), snaps, strict=True))
        return states

    def checkpoint(self, session: Session, *, first: bool = False, periodic: bool = False) -> None:
        """Write an idle in-memory session's state to the tier and keep it in memory: its
        journal records up to here are no longer needed. `first`: a fork's child, whose first
        checkpoint is its whole history; `periodic`: the one `Durability.due` asked for.
        Raises what the tier's write does."""
        served = self.versions.find(session.model, session.version)
        assert served is not None and session.slot is not None, "only a session in memory"
        record = self.checkpoint_record(session, served.pool.snapshot(session.slot))
        self.save(session, record, first=first, periodic=periodic)

    def save(
        self,
        session: Session,
        record: SpillRecord,
        *,
        durable: bool = False,
        first: bool = False,
        periodic: bool = False,
        past_cap: bool = False,
    ) -> None:
        """`record` of `session` to the tier; then its journal records are no longer needed."""
        self.write_record(record, durable=durable, first=first, past_cap=past_cap)
        self.sessions.written(session)
        self.durability.checkpointed(session, periodic=periodic)

    def write_record(
        self,
        record: SpillRecord,
        *,
        durable: bool = False,
        first: bool = False,
        past_cap: bool = False,
    ) -> None:
        """`record` to the tier, counted and timed (`writes`, `write_seconds`) when it lands;
        counted in `write_failures` when the tier refuses it (not when another replica holds
        the session)."""
        start = time.perf_counter()
        try:
            self.tier.write(record, durable=durable, first=first, past_cap=past_cap)
        except SessionMoved:
            raise
        except SeqServeError:
            self.write_failures += 1
            raise
        self.write_seconds += time.perf_counter() - start
        self.writes += 1

    def checkpoint_record(self, session: Session, state: SlotSnapshot) -> SpillRecord:
        """The checkpoint of `session` as it stands now, with `state` (read from its slot, or
        computed elsewhere: a replay of its journal)."""
        return SpillRecord(self.header(session), state)

    def header(self, session: Session) -> SpillHeader:
        """The checkpoint header of a session as it stands now."""
        served = self.versions.find(session.model, session.version)
        assert served is not None
        return header_of(session, served.config, self.sessions.last_used_wall(session))

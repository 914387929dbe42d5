"""Where each session's state lives: a state-pool slot, or a record in the spill tier.

When a version's pool cannot get a slot within the byte budget, it first takes back capacity
other versions' pools hold but do not use; then the least recently used idle session (of any
version) is written to the spill tier and its slot reused, and so on until a slot fits. Only a
session whose eviction helps is taken: one of the version's own, or one in a pool that can
shrink for it (not below a busy session's slot), when such pools can free a slot's worth. A spilled
session is restored on its next use, bit for bit: state, position and RNG, so its next
prediction is the one it would have made had it never left. Busy sessions (a request or a
generation running) never move. Everything here runs on the event loop, so a session is never
half spilled when a request for it arrives; only a shutdown's write (`shutdown_write`) calls in
from a thread of its own, once the residency is frozen. A spilled session's record is written
by `CheckpointWriter` (`checkpoint_writer.py`), as every checkpoint is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

from service.engine import eviction_choice
from service.engine.applied_request import from_record
from service.engine.checkpoint_header import session_from
from service.engine.checkpoint_writer import CheckpointWriter
from service.engine.durability import Durability
from service.engine.newer_records import CHECKPOINTED
from service.engine.served_version import ServedVersion
from service.engine.served_versions import ServedVersions
from service.errors import (
    PoolExhausted,
    ResourceExhausted,
    SessionMoved,
    SpillCorrupted,
    SpillMismatch,
    Unavailable,
    WrittenByNewer,
)
from service.runtime.state_pool import SlotSnapshot
from service.sessions.clean_downtimes import CleanDowntimes, modified
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.spill_directory import TierScan
from service.sessions.spill_record import SpillHeader
from service.sessions.spill_tier import SpillTier
from service.sessions.state_tier import Checkpoints

log = logging.getLogger(__name__)

SessionEvent = Callable[[str, Session], None]  # ("evicted" | "restored", session)


class SessionResidency:
    def __init__(
        self,
        sessions: SessionStore,
        versions: ServedVersions,
        tier: Checkpoints,
        on_event: SessionEvent,
        durability: Durability,
        writer: CheckpointWriter,
        wait_seconds: float = 0.0,
    ) -> None:
        self.durability = durability
        self.writer = writer  # how a spilled session's record is written
        self.sessions = sessions
        self.versions = versions
        self.tier = tier
        self._on_event = on_event
        self._wait_seconds = wait_seconds
        self._went_idle = asyncio.Event()
        self._frozen = False  # `freeze`: a shutdown writes what is in memory; nothing changes it
        self._damaged: set[str] = set()  # sessions whose checkpoint was found damaged (`damaged`)
        self._downtimes = CleanDowntimes()  # what `idle_since` skips

    # ---- start-up ------------------------------------------------------------------------

    def open(self) -> int:
        """Index the spill tier: every record becomes a spilled session, restored on first use.
        Unreadable ones are remembered as broken (a request for one gets DATA_LOSS); one a
        newer seqserve wrote, in a later format, is refused as such (WrittenByNewer,
        FAILED_PRECONDITION: not damage, not counted) and kept (`newer_records`).

        Idle time runs on from where it stood at the last clean stop: the time the server was
        down does not count (clients could not reach it), at this start or any later one
        (`idle_since`). After a crash the stop time is unknown, and that downtime counts. A
        record past its TTL is kept all the same: its checkpoint's last use is not the
        session's when steps were journaled after it (`Recovery` restarts its idle clock
        then). One still past its TTL once the journal is read is ended by the TTL sweeper,
        which journals its END: deleting it here, unrecorded, let its CREATE record bring it
        back from zero.
        """
        scan = self.tier.open()
        for session_id, why in scan.broken.items():
            self.sessions.mark_broken(session_id, why, owner=scan.owners.get(session_id, ""))
            self.damaged(session_id)
        for session_id, owner in scan.newer.items():
            self.sessions.mark_broken(session_id, CHECKPOINTED, WrittenByNewer, owner=owner)
        self._note_downtimes(scan)
        adopted = 0
        for header in scan.headers:
            idle = self.idle_since(header.last_used_wall)
            try:
                session = session_from(header, self.sessions.clock() - idle)
            except (TypeError, ValueError, KeyError) as exc:  # numpy rejected the RNG state
                self.sessions.mark_broken(header.session_id, f"unusable RNG state: {exc}")
                continue
            self.adopt(session, header)
            adopted += 1
        return adopted

    def damaged(self, session_id: str) -> None:
        """The session's checkpoint was found damaged (its header at start-up, its state when
        read): counted once a session, however often it is refused."""
        self._damaged.add(session_id)

    @property
    def damaged_checkpoints(self) -> int:
        return len(self._damaged)

    def idle_since(self, last_used_wall: float) -> float:
        """Seconds the server was up since `last_used_wall` (a checkpoint's, a record file's
        write): the wall time since, less the downtime of every clean stop since."""
        return self._downtimes.idle_since(last_used_wall, self.sessions.wall_clock())

    def _note_downtimes(self, scan: TierScan) -> None:
        """The clean stops' downtimes, with the one that ends now (`CleanDowntimes`); only in
        the local spill tier: a shared tier's clock did not stop."""
        tier = self.tier
        if not isinstance(tier, SpillTier):
            return
        last_uses = itertools.chain(
            (h.last_used_wall for h in scan.headers),
            (modified(tier.path(session_id)) for session_id in [*scan.broken, *scan.newer]),
        )
        self._downtimes.note(tier.directory, scan.stopped_at, self.sessions.wall_clock(), last_uses)

    def adopt(self, session: Session, header: SpillHeader) -> None:
        """A session read back from its checkpoint (`header`) joins the live ones, spilled."""
        self.sessions.adopt(session)
        self.sessions.remember(session, from_record(header.last_request))
        self.versions.pin(session.model, session.version)

    # ---- slots ---------------------------------------------------------------------------

    async def allocate(self, served: ServedVersion) -> int:
        """A zeroed slot in `version`'s pool, evicting idle sessions to the spill tier if need be.

        When no eviction can make room (every session in memory is busy, or the idle ones sit
        in pools a busy session keeps from shrinking), waits up to `slot_wait_seconds` for one
        to go idle (a request finishing), then raises PoolExhausted. The wait cannot deadlock: a
        waiter holds no slot, and the busy sessions holding them finish their steps. Raises
        SpillTierFull when the tier cannot take the eviction."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_seconds
        while True:
            if self._frozen:
                raise Unavailable("server is shutting down; retry on another replica")
            try:
                return self._allocate_now(served)
            except PoolExhausted:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
            self._went_idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._went_idle.wait(), remaining)

    def notify_idle(self) -> None:
        """A session went idle or ended: waiting allocations may find a victim now."""
        self._went_idle.set()

    def _allocate_now(self, served: ServedVersion) -> int:
        while True:
            try:
                return served.pool.allocate()
            except ResourceExhausted:  # the budget allows no growth: make room
                pass
            if self._reclaim(served):
                continue
            victim = eviction_choice.victim(self.sessions, self.versions, served)
            if victim is None:
                raise eviction_choice.exhausted(self.sessions, served)
            try:
                self.spill(victim)
            except SessionMoved:  # another replica holds it: this copy is stale
                self.let_go(victim)
                continue
            self._on_event("evicted", victim)

    def _reclaim(self, wanting: ServedVersion) -> bool:
        """Shrink other versions' pools to what they use; True if any bytes came back."""
        for other in self.versions.served():
            if other is wanting or other.pool.used_slots == other.pool.capacity:
                continue
            owners = {
                s.slot: s
                for s in self.sessions.resident((other.name, other.version))
                if s.slot is not None
            }
            movable = [slot for slot, s in owners.items() if not s.busy]
            before = other.pool.nbytes
            for old, new in other.pool.compact(movable).items():
                self.sessions.set_slot(owners[old], new)
            if other.pool.nbytes < before:
                return True
        return False

    # ---- spill and restore ---------------------------------------------------------------

    def spill(
        self, session: Session, *, durable: bool = False, state: SlotSnapshot | None = None
    ) -> None:
        """Write an idle in-memory session to the tier and free its slot. With a journal, a
        session whose checkpoint is current (written since its last use: an idle checkpoint,
        usually) is not written again: the tier keeps every checkpoint's record. `state`: its
        slot's, when already read (`CheckpointWriter.states`)."""
        served = self.versions.find(session.model, session.version)
        assert served is not None and session.slot is not None, "only a session in memory spills"
        if self.needs_record(session):
            if state is None:
                state = served.pool.snapshot(session.slot)
            # A shutdown's write (frozen) may pass the tier's cap: refused, the session
            # would be lost with the process.
            record = self.writer.checkpoint_record(session, state)
            self.writer.save(session, record, durable=durable, past_cap=self._frozen)
        served.pool.free(session.slot)
        self.sessions.set_slot(session, None)

    def needs_record(self, session: Session) -> bool:
        """Whether spilling the session writes it: not with a journal and a current record."""
        return not (self.durability.enabled and self.sessions.record_is_current(session))

    async def restore(self, session: Session, served: ServedVersion) -> None:
        """Bring a spilled session back into a slot. Its record is checked first: a damaged one
        raises SpillCorrupted (DATA_LOSS), one for other weights SpillMismatch; neither is used."""
        if self._frozen:  # a request that outlived the drain must not undo the shutdown spill
            raise Unavailable("server is shutting down; retry on another replica")
        try:
            record = self.tier.read(session.session_id)
        except SpillCorrupted:
            self.damaged(session.session_id)
            raise
        header = record.header
        if (header.model, header.version, header.position) != (
            session.model,
            session.version,
            session.position,
        ):
            raise SpillCorrupted(
                f"spill record of session {session.session_id!r} is for {header.model}:"
                f"{header.version} at position {header.position}, the session is "
                f"{session.model}:{session.version} at {session.position}"
            )
        if header.fingerprint != served.fingerprint:
            raise SpillMismatch(
                f"session {session.session_id!r} was spilled from weights {header.fingerprint}, "
                f"but {served.name}:{served.version} now has {served.fingerprint}; its state "
                "means nothing to these weights"
            )
        cfg = served.config
        shape = (cfg.num_layers, cfg.hidden_size, cfg.has_cell_state, cfg.output_dim)
        if (header.num_layers, header.hidden_size, header.has_cell_state, header.output_dim) != (
            shape
        ):
            raise SpillMismatch(
                f"spill record of session {session.session_id!r} has state shaped for another "
                f"architecture than {served.name}:{served.version}"
            )
        slot = await self.allocate(served)  # the session is busy: never its own victim
        served.pool.restore(slot, record.state)
        self.sessions.set_slot(session, slot)
        if not self.durability.enabled:  # with a journal the record stays: it is the checkpoint
            self.tier.delete(session.session_id)
        self._on_event("restored", session)

    def copy_state(self, served: ServedVersion, source: int, target: int) -> None:
        """A fork: `target`'s state becomes a copy of `source`'s."""
        served.pool.restore(target, served.pool.snapshot(source))

    def free_slot(self, served: ServedVersion, slot: int) -> None:
        """Give back a slot no session holds (a creation that failed), and wake waiters."""
        served.pool.free(slot)
        self.notify_idle()

    def let_go(self, session: Session) -> None:
        """Forget this process's copy of a session another process holds now: its slot
        freed, the tier's record left to the holder, its version unpinned."""
        self.discard(session)
        self.sessions.forget(session, moved=True)
        self.versions.unpin(session.model, session.version)
        self._on_event("moved", session)

    def discard(self, session: Session) -> None:
        """The session ended: free its slot or delete its record."""
        if session.slot is not None:
            served = self.versions.find(session.model, session.version)
            if served is not None:
                served.pool.free(session.slot)
            self.sessions.set_slot(session, None)
        self.tier.delete(session.session_id)

    def freeze(self) -> None:
        """From now on nothing comes into memory and no session ends (`frozen`): a shutdown is
        writing the sessions in memory, on a thread of its own (`shutdown_write`)."""
        self._frozen = True

    @property
    def frozen(self) -> bool:
        return self._frozen

"""Taking sessions over from the shared state tier, on first use (DESIGN section 10).

With a shared tier, a request for a session this replica does not hold takes it over before
anything else: one script bumps the session's epoch (so the previous holder, alive, frozen or
dead, has every later write refused) and reads its checkpoint and journal; the session then
joins this replica exactly as after a restart — at its position, its journal replayed when the
lease needs its state (`Recovery.take_over`, `PendingReplays`). Its version is loaded if this
replica has not loaded it yet (a version missing from the store: FAILED_PRECONDITION).

A replica whose write was refused (`SessionMoved`: it was taken over) drops its copy at the next
request for the session and takes it back the same way, so a retry always lands on the state
the tier holds. Without a shared tier (the local directory) this does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from service.engine.recovery import Recovery
from service.engine.replay import PendingReplays
from service.engine.served_version import VersionObserver
from service.engine.served_versions import ServedVersions
from service.engine.session_residency import SessionResidency
from service.errors import SeqServeError, SessionMoved, SessionRefusal, SpillCorrupted
from service.security.principal import caller, may_see
from service.sessions import journal_record as jr
from service.sessions.session import SESSION_ID_PATTERN, Session
from service.sessions.session_store import SessionStore
from service.sessions.shared_tier import Claimed, SharedState

log = logging.getLogger(__name__)
_ID_RE = re.compile(SESSION_ID_PATTERN)


class Takeover:
    def __init__(
        self,
        state: SharedState | None,
        sessions: SessionStore,
        versions: ServedVersions,
        residency: SessionResidency,
        replays: PendingReplays,
        observer: VersionObserver,
    ) -> None:
        self._state = state
        self._sessions = sessions
        self._versions = versions
        self._residency = residency
        self._replays = replays
        self._observer = observer
        self._claiming: dict[str, asyncio.Future[None]] = {}

    @property
    def shared(self) -> bool:
        return self._state is not None

    async def start(self) -> None:
        """Check the tier is reachable and configured not to lose sessions (raises
        StateTierUnusable: the server does not start)."""
        if self._state is not None:
            await asyncio.to_thread(self._state.check)

    async def ensure(
        self, session_id: str, expected_position: int | None = None, *, read_only: bool = False
    ) -> None:
        """Make sure this replica holds `session_id` if the tier has it; afterwards the session
        store answers for it (the session, or why there is none).

        A copy this replica still has may be stale without its knowing (another took the
        session over, and this one has not written it since): a request expecting another
        position than the copy's asks the tier whose it is, so a client moving between
        replicas is not told FAILED_PRECONDITION by a stale copy. So does a `read_only`
        request (a fork: it copies the state and writes nothing of the session, so no write
        would be refused to tell it the copy was stale), which also restarts the session's
        TTL in the tier, as a write would."""
        state = self._state
        if state is None or not _ID_RE.fullmatch(session_id):
            return
        while (running := self._claiming.get(session_id)) is not None:
            await asyncio.shield(running)  # another request of ours is taking it over
        local = self._sessions.peek(session_id)
        if local is None and self._sessions.refused_for_good(session_id):
            # Refused here for good (damaged): answered from what this replica learned. A
            # claim would read all its records again and refuse it again, at each request.
            # Not one refused for its version: the store may hold it again, or another
            # replica may have closed it, so the tier is asked again.
            return
        if local is not None:
            if not may_see(local.owner):
                return  # not the caller's: the session store answers NOT_FOUND
            if session_id not in state.moved:
                if not read_only and expected_position in (None, local.position):
                    return
                if local.busy or local.replay_pending:
                    return  # its own request or replay decides; a stale write is refused
                epoch = await self._epoch(state, local, keep_alive=read_only)
                if epoch == local.holder_epoch:
                    return  # ours: the client is wrong, and the lease says so
            self.drop(local)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._claiming[session_id] = done
        try:
            await self._take(state, session_id)
        except SessionRefusal as exc:  # its checkpoint or journal is damaged, or a newer's
            self._refuse(session_id, exc)
        finally:
            del self._claiming[session_id]
            done.set_result(None)

    def _refuse(self, session_id: str, exc: SessionRefusal) -> None:
        """A session the tier holds but this replica cannot take: anyone but its owner hears
        the NOT_FOUND of an id that never existed (the session store has no such session).
        Damaged, it is refused to its owner from now on, until the tier no longer holds it
        (`SharedRefusals`); a newer server's, the owner hears it now (raised), and a replica
        of that version takes it. A damaged checkpoint is counted here, once a session
        (`seqserve_state_damaged_records_total{kind="checkpoint"}`); damaged journal records
        are counted by the tier as it reads them."""
        assert isinstance(exc, SeqServeError)  # every refusal is one (the mixin is not)
        if isinstance(exc, SpillCorrupted):
            self._residency.damaged(session_id)
        if not may_see(exc.owner):
            return
        if not exc.lasting:
            raise exc
        self._sessions.mark_broken(session_id, exc.message, type(exc), exc.owner)

    @staticmethod
    async def _epoch(state: SharedState, session: Session, *, keep_alive: bool) -> int:
        """The session's epoch in the tier; with `keep_alive`, its TTL there restarted if the
        epoch is this copy's."""
        if not keep_alive:
            return await asyncio.to_thread(state.epoch_of, session.session_id)
        ttl_ms = int(session.ttl_seconds * 1000)
        return await asyncio.to_thread(
            state.keep_alive, session.session_id, session.holder_epoch, ttl_ms, session.owner
        )

    def drop(self, session: Session) -> None:
        """Forget this replica's copy of a session another replica holds now."""
        if session.busy:  # a request of ours still runs on it: its write will be refused
            raise SessionMoved(
                f"session {session.session_id!r} is moving to this replica; retry shortly"
            )
        assert self._state is not None
        self._state.moved.discard(session.session_id)
        self._residency.let_go(session)
        log.info("session %s is held by another replica now", session.session_id)

    async def made(self, made_by: str) -> Session | None:
        """The session a create or fork request made on any process (taken over here), for
        a retry that reaches another process than the first call did."""
        if self._state is None:
            return None
        session_id = await asyncio.to_thread(self._state.made, made_by)
        if not session_id:
            return None
        await self.ensure(session_id)
        session = self._sessions.peek(session_id)
        return session if session is not None and session.made_by == made_by else None

    async def purge(self) -> None:
        """Sessions whose holder died expire in the tier too (the sweeper calls this)."""
        if self._state is not None:
            gone = await asyncio.to_thread(self._state.purge_expired)
            if gone:
                log.info("%d sessions expired in the state tier", gone)

    def moved(self, session_id: str) -> bool:
        """This replica's copy is stale: a write of it was refused."""
        return self._state is not None and session_id in self._state.moved

    async def holds(self, session: Session) -> bool:
        """This replica still holds `session` (the tier's epoch is its own): a read-only answer
        from it is current."""
        if self._state is None:
            return True
        if session.session_id in self._state.moved:
            return False
        epoch = await asyncio.to_thread(self._state.epoch_of, session.session_id)
        return epoch == session.holder_epoch

    async def describe(self, session_id: str) -> Session:
        """The session as the tier holds it, without taking it over (GetSession)."""
        assert self._state is not None
        if self._sessions.refused_for_good(session_id):  # damaged: see `ensure`
            return self._sessions.get(session_id)  # raises why (NOT_FOUND to a stranger)
        try:
            found = await asyncio.to_thread(self._state.peek, session_id)
        except SessionRefusal as exc:
            self._refuse(session_id, exc)  # raises a newer server's to its owner
            return self._sessions.get(session_id)  # raises NOT_FOUND, or why it is refused
        if found.epoch and not may_see(_owner(found)):
            return self._sessions.get(session_id)  # not the caller's: NOT_FOUND
        if found.epoch == 0:
            self._gone(session_id, found)
            return self._sessions.get(session_id)  # raises: NOT_FOUND, or why it ended
        recovery = Recovery(self._sessions, self._versions, self._residency, self._replays)
        session = await recovery.describe(session_id, found.checkpoint, found.records)
        if session is None or not may_see(session.owner):
            return self._sessions.get(session_id)  # raises NOT_FOUND (or why it is gone)
        return session

    async def _take(self, state: SharedState, session_id: str) -> None:
        started = time.perf_counter()
        if caller() is not None:  # ownership is checked before anything moves
            try:
                found = await asyncio.to_thread(state.peek, session_id)
            except SessionRefusal as exc:
                if not (exc.lasting and may_see(exc.owner)):
                    raise  # claimed by no one: `_refuse` answers (a stranger: NOT_FOUND)
                # The caller's and damaged: claimed all the same (refused again below, once
                # its epoch is raised), so the replica that held it writes nothing more.
            else:
                if found.epoch and not may_see(_owner(found)):
                    return  # not the caller's: the session store answers NOT_FOUND
        claimed = await asyncio.to_thread(state.claim, session_id)
        if claimed.epoch == 0:
            self._gone(session_id, claimed)
            return
        state.moved.discard(session_id)
        recovery = Recovery(self._sessions, self._versions, self._residency, self._replays)
        await recovery.take_over(session_id, claimed.checkpoint, claimed.records, claimed.epoch)
        session = self._sessions.peek(session_id)
        if session is not None:
            elapsed = time.perf_counter() - started
            self._observer.on_takeover(session.model, str(session.version), elapsed)
            self._observer.on_session_event("taken_over", session.model, str(session.version))
            log.info("took session %s over at epoch %d", session_id, claimed.epoch)

    def _gone(self, session_id: str, found: Claimed) -> None:
        """The tier has no such session: the session store learns why it ended from its
        tombstone. Without one, a session this replica let go as moved expired (its TTL lapsed
        in the tier, which no replica holds it in): NOT_FOUND, not a retry that never lands."""
        if found.ended:
            self._sessions.ended_earlier(session_id, found.ended, found.ended_owner)
            return
        try:
            self._sessions.get(session_id)
        except SessionMoved:
            self._sessions.ended_earlier(session_id, "expired")
        except SeqServeError:
            pass  # never here, or ended here: the store already says which


def _owner(found: Claimed) -> str:
    """Who owns the session the tier holds: its checkpoint says, or its creation record."""
    if found.checkpoint is not None:
        return found.checkpoint.header.owner
    for record in found.records:
        if record.kind == jr.CREATE and record.meta is not None:
            return str(record.meta.get("owner", ""))
    return ""

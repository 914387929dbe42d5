"""How sessions refused since start-up end (their record damaged, their journal broken, their
version missing from the store): closed by their owner, or expired by the sweeper once their TTL
has passed since their last use as far as their record tells (`_ttl_end`). Either journals an
END first, so no record left in the journal brings the session back, then deletes what it
kept: its checkpoint, and the journal records recovery held for it. One refused because a newer
seqserve wrote it (`newer_records`) is never expired here: its last use and TTL are in what
this server cannot read, and what it kept is a newer server's to serve; only a close ends it.

Nothing of such a session can be used, so ending it is the only thing done with it; a live
session (rebuilt from its journal though its checkpoint could not be read) is never one of
them (`SessionStore.adopt` takes it off the refused list).

With a shared state tier, the tier's TTL ends its sessions there, refused or not: this replica
only learns it (`SharedRefusals`)."""

from __future__ import annotations

import logging
import math

from service.engine.background import Slices
from service.engine.durability import Durability
from service.engine.session_residency import SessionResidency
from service.engine.shared_refusals import SharedRefusals
from service.errors import SeqServeError, Unavailable, WrittenByNewer
from service.runtime.sampler import DEFAULT_SAMPLING, SessionRng
from service.sessions.clean_downtimes import modified
from service.sessions.journal import Journal
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.shared_checkpoints import SharedCheckpoints
from service.sessions.shared_journal import SharedJournal
from service.sessions.spill_tier import SpillTier

log = logging.getLogger(__name__)


class RefusedSessions:
    def __init__(
        self,
        sessions: SessionStore,
        residency: SessionResidency,
        durability: Durability,
        ttl_default: float,
    ) -> None:
        self._sessions = sessions
        self._residency = residency
        self._durability = durability
        self._ttl_default = ttl_default
        # Refused session → when it expires (the store's clock), read from its record once.
        self._until: dict[str, float] = {}
        self._soonest = math.inf  # the earliest of them: the sweep looks again from then on
        tier = residency.tier
        self._shared = (
            SharedRefusals(tier.state, sessions) if isinstance(tier, SharedCheckpoints) else None
        )

    def is_refused(self, session_id: str) -> bool:
        """Whether `session_id` names a refused session (and no live one)."""
        return not self._sessions.contains(session_id) and session_id in self._sessions.broken

    def close(self, session_id: str) -> Session:
        """Close a refused session: closing is how its owner lets its record go (it would
        stay, counted against the tier's bytes, forever). Its END is journaled first (refused,
        changing nothing, when the journal cannot take it); then what it kept goes. The reply's
        session names only its id.

        Not with a shared state tier: the END is fenced there by the epoch of a replica that
        holds the session, which this one never did (a retry would take the session over
        again and be refused again, UNAVAILABLE for ever). Refused with its own error instead:
        a replica that can load its version closes it, or its TTL in the tier ends it."""
        if self._residency.frozen:
            raise Unavailable("server is shutting down; close the session once it is back")
        if isinstance(self._durability.journal, SharedJournal):
            error = self._sessions.broken_error(session_id)  # NOT_FOUND if not the caller's
            raise error(
                f"session {session_id!r} cannot be closed on this replica: "
                f"{self._sessions.broken[session_id]}; close it on a replica that can load "
                "it, or its TTL in the state tier ends it"
            )
        gone = self._stand_in(session_id)
        gone.owner = self._sessions.broken_owner(session_id)  # NOT_FOUND if not the caller's
        self._durability.ended(gone, "closed", must_record=True)
        self._sessions.close_broken(session_id)
        self._delete(session_id)
        return gone

    async def sweep(self, slices: Slices) -> int:
        """End the refused sessions idle past their TTL (`_ttl_end`): nothing else frees what
        they keep on disk, a checkpoint nobody can use counted against the tier's bytes, and
        one whose owner is unknown cannot even be closed while auth is on. Its END is journaled
        (a disk refusing it is counted, as for any expiry), so nothing left brings it back; a
        late request hears it expired. Only with the local spill tier: a shared tier's TTL
        ends its sessions there, and a refusal here lasts until the tier no longer holds the
        session (`SharedRefusals`). Returns how many ended."""
        if self._shared is not None:
            return await self._shared.sweep(slices)
        refused = self._sessions.broken
        if not (refused or self._until) or not isinstance(self._residency.tier, SpillTier):
            return 0
        if refused.keys() == self._until.keys() and self._sessions.clock() <= self._soonest:
            return 0  # none refused or closed since the last look, none due
        for closed in self._until.keys() - refused.keys():
            del self._until[closed]
        ended = 0
        for session_id in list(refused):
            await slices.breathe()
            if session_id not in refused:
                continue  # closed while requests ran
            if self._sessions.contains(session_id):
                continue  # live (rebuilt from its journal): never a refused one's to end
            until = self._until.get(session_id)
            if until is None:  # first seen: its record is read, once
                until = self._until[session_id] = self._ttl_end(session_id)
            if self._sessions.clock() > until:
                self._expire(session_id)
                ended += 1
        self._soonest = min(self._until.values(), default=math.inf)
        return ended

    def _ttl_end(self, session_id: str) -> float:
        """When a refused session expires, on the store's clock: its TTL after its last use as
        far as its record tells. A readable checkpoint gives both (its steps journaled since
        are not timed: the checkpoint's last use stands for them). A record whose header cannot
        be read gives neither: the default TTL from the file's last write (from now if that
        cannot be read either). With no record (refused before its first checkpoint: only its
        journal records), the default TTL from now, the start that refused it. As for any
        session, the time the server was down after a clean stop does not count
        (`SessionResidency.idle_since`). Never, for one a newer seqserve wrote."""
        if self._sessions.gone.refused_as(session_id) is WrittenByNewer:
            return math.inf
        now = self._sessions.clock()
        tier = self._residency.tier
        assert isinstance(tier, SpillTier)
        if session_id not in tier:
            return now + self._ttl_default
        try:
            header = tier.read(session_id).header
        except SeqServeError:  # an unreadable file's time is +inf: no time up since
            idle = self._residency.idle_since(modified(tier.path(session_id)))
            return now - idle + self._ttl_default
        return now - self._residency.idle_since(header.last_used_wall) + header.ttl_seconds

    def _expire(self, session_id: str) -> None:
        self._until.pop(session_id, None)
        log.info("refused session %s expired: what it kept is deleted", session_id)
        self._durability.ended(self._stand_in(session_id), "expired")
        self._sessions.ended_earlier(session_id, "expired")
        self._delete(session_id)

    def _stand_in(self, session_id: str) -> Session:
        """A refused session as its END is written from: of all it was, only its id is sure."""
        return Session(
            session_id=session_id, model="", version=0, fingerprint="", slot=None,
            rng=SessionRng.seeded(0), default_sampling=DEFAULT_SAMPLING, ttl_seconds=0.0,
            created_at=0.0, last_used=self._sessions.clock(), closed=True,
        )  # fmt: skip

    def _delete(self, session_id: str) -> None:
        """What a refused session kept goes: its checkpoint, and its records held in the
        journal (`Recovery._keep`)."""
        self._residency.tier.delete(session_id)
        journal = self._durability.journal
        if isinstance(journal, Journal):
            journal.release(session_id)

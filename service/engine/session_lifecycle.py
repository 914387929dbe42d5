"""Sessions begin and end here: create, fork, close, and expiry by the sweeper.

A session is created on the version its model/alias resolves to and pinned there for good; a
fork copies another's state, position and RNG into a new slot. A session ends when closed or
when the sweeper finds it idle past its TTL: its slot is freed or its spill record deleted, its
version unpinned, and a version nothing needs any more unloaded in the background.

A session refused since start-up (its record damaged, its journal broken, its version missing
from the store) ends the same ways, through `RefusedSessions`.
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from service.engine.background import Slices
from service.engine.durability import Durability
from service.engine.refused_sessions import RefusedSessions
from service.engine.served_version import ServedVersion, VersionObserver
from service.engine.served_versions import ServedVersions
from service.engine.session_lease import SessionLeases
from service.engine.session_residency import SessionResidency
from service.errors import InvalidArgument, SeqServeError, Unavailable
from service.runtime.sampler import DEFAULT_SAMPLING, SamplingParams, SessionRng
from service.security.principal import owner_for_new
from service.sessions.session import Session, made_key, new_session_id, route_of
from service.sessions.session_store import SessionStore
from service.settings import SessionSettings


class SessionLifecycle:
    def __init__(
        self,
        sessions: SessionStore,
        versions: ServedVersions,
        residency: SessionResidency,
        leases: SessionLeases,
        durability: Durability,
        limits: SessionSettings,
        max_generate_tokens: int,
        observer: VersionObserver,
    ) -> None:
        self._sessions = sessions
        self._versions = versions
        self._residency = residency
        self._leases = leases
        self._durability = durability
        self._ttl_default = limits.ttl_seconds
        self._ttl_max = limits.max_ttl_seconds
        self._max_generate = max_generate_tokens
        self._observer = observer
        self._chores: set[asyncio.Task[None]] = set()  # unloads started when sessions end
        self._refused = RefusedSessions(sessions, residency, durability, limits.ttl_seconds)

    async def version_for_new_session(self, model: str, version: str) -> ServedVersion:
        """The version a new session of `model` gets (checked: capacity first)."""
        self._sessions.check_capacity()
        return await self._versions.resolve(model, version)

    async def create(
        self,
        served: ServedVersion,
        *,
        seed: int | None,
        ttl_seconds: float | None,
        default_sampling: SamplingParams | None,
        request_id: str = "",
        route: str = "",
        prefixed: bool | None = None,
    ) -> Session:
        ttl = self.ttl(ttl_seconds)
        sampling = default_sampling or DEFAULT_SAMPLING
        if served.tokenizer is not None:
            sampling.validate(served.config.output_dim, self._max_generate)
        if seed is None:
            seed = secrets.randbits(63)
        self._versions.pin(served.name, served.version)  # keeps it loaded while a slot is found
        try:
            slot = await self._residency.allocate(served)
            session = Session(
                session_id=new_session_id(route),
                model=served.name,
                version=served.version,
                fingerprint=served.fingerprint,
                slot=slot,
                rng=SessionRng.seeded(seed),
                default_sampling=sampling,
                ttl_seconds=ttl,
                created_at=time.time(),
                last_used=self._sessions.clock(),
                seed=seed,
                owner=owner_for_new(),
                made_by=made_key("create", request_id, owner_for_new()) if request_id else "",
                prefixed=prefixed if request_id else None,
            )
            self._register(session, served)
        except BaseException:
            self._versions.unpin(served.name, served.version)
            raise
        try:
            self._durability.created(session)
        except SeqServeError:
            self.end(session, "closed", journal=False, counted=False)
            raise
        self._observer.on_session_event("created", session.model, str(session.version))
        return session

    async def fork(
        self,
        session_id: str,
        ttl_seconds: float | None = None,
        seed: int | None = None,
        request_id: str = "",
    ) -> Session:
        """A new session with a copy of the source's state, position and RNG (or a new seed)."""
        ttl = self.ttl(ttl_seconds) if ttl_seconds is not None else None  # None: the source's
        if self._sessions.peek(session_id) is not None:  # (an unknown one: NOT_FOUND first)
            self._sessions.check_capacity()  # before its lease brings a spilled source back
        async with self._leases.hold(session_id) as lease:
            source, served = lease.session, lease.served
            self._sessions.check_capacity()
            slot = await self._residency.allocate(served)  # the source is leased: not evicted
            assert source.slot is not None
            self._residency.copy_state(served, source.slot, slot)
            child = Session(
                session_id=new_session_id(route_of(source.session_id)),  # same replica
                model=source.model,
                version=source.version,
                fingerprint=source.fingerprint,
                slot=slot,
                rng=source.rng.copy() if seed is None else SessionRng.seeded(seed),
                seed=source.seed if seed is None else seed,
                parent_session_id=source.session_id,
                default_sampling=source.default_sampling,
                ttl_seconds=source.ttl_seconds if ttl is None else ttl,
                created_at=time.time(),
                last_used=self._sessions.clock(),
                position=source.position,
                owner=owner_for_new(),  # a fork belongs to whoever forked
                made_by=made_key("fork", request_id, owner_for_new()) if request_id else "",
            )
            self._versions.pin(child.model, child.version)
            try:
                self._register(child, served)
            except BaseException:
                self._versions.unpin(child.model, child.version)
                raise
            if self._durability.enabled:  # the child's first checkpoint is its whole history
                try:
                    self._residency.writer.checkpoint(child, first=True)
                except SeqServeError:
                    self.end(child, "closed", journal=False, counted=False)
                    raise
            self._observer.on_session_event("forked", child.model, str(child.version))
            return child

    async def close(self, session_id: str) -> Session:
        if self._refused.is_refused(session_id):
            return self._refused.close(session_id)
        async with self._leases.hold(session_id, bring_in=False) as lease:
            if self._residency.frozen:  # a shutdown is writing it: closing now would race that
                raise Unavailable(
                    "server is shutting down; close the session on another replica, or here "
                    "once the server is back"
                )
            self.end(lease.session, "closed", must_record=True)
            return lease.session

    async def sweep_expired(self, slices: Slices | None = None) -> int:
        """End every session idle past its TTL (leased ones never are), refused ones too, in
        `slices` (each end is a journal record and a file deleted); returns how many."""
        slices = slices or Slices()
        ended = 0
        for session in self._sessions.expired():
            await slices.breathe()
            if self._sessions.peek(session.session_id) is not session:
                continue  # ended (or replaced) while requests ran
            if not self._sessions.is_expired(session):
                continue  # used meanwhile
            self.end(session, "expired")
            ended += 1
        return ended + await self._refused.sweep(slices)

    def end(
        self,
        session: Session,
        why: str,
        *,
        journal: bool = True,
        must_record: bool = False,
        counted: bool = True,
    ) -> None:
        """End the session: journaled (refused, changing nothing, if `must_record` and the
        journal cannot take it), removed, its slot or record freed, its version unpinned.
        `counted`: a session event (not for one whose create or fork was refused: it never
        counted as made)."""
        if journal:
            self._durability.ended(session, why, must_record=must_record)
        else:
            self._durability.checkpointed(session)  # nothing of it is needed any more
        self._sessions.remove(session, why)
        self._residency.discard(session)
        self._residency.notify_idle()
        self._versions.unpin(session.model, session.version)
        if counted:
            self._observer.on_session_event(why, session.model, str(session.version))
        self._chore(self._versions.release_if_unused(session.model, session.version))

    async def settle(self) -> None:
        """Wait for the unloads that ended sessions started in the background."""
        while self._chores:
            await asyncio.gather(*list(self._chores), return_exceptions=True)

    def cancel_chores(self) -> list[asyncio.Task[None]]:
        for task in self._chores:
            task.cancel()
        return list(self._chores)

    def ttl(self, requested: float | None) -> float:
        if requested is None:  # unset; one set to 0 is refused, as the range says
            return self._ttl_default
        if not 0 < requested <= self._ttl_max:
            raise InvalidArgument(f"ttl must be in (0, {self._ttl_max}] seconds, got {requested}")
        return requested

    def _register(self, session: Session, served: ServedVersion) -> None:
        """Add a new session whose slot is allocated (and version pinned) to the store (its
        event is counted once it is made durable)."""
        try:
            self._sessions.add(session)
        except SeqServeError:
            assert session.slot is not None
            self._residency.free_slot(served, session.slot)
            raise

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

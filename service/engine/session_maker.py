"""Making sessions: creation (with a prefix fed at once) and forks, exactly once per request id.

A create or fork that names a request id is remembered by the session store (`made_by`, which
survives a restart in the session's creation record and checkpoint): a retry returns what the
first call made, with the prefix's prediction while the prefix is the session's last request;
one whose first call's creation write landed only after the call failed (the shared tier did
not answer in time) finds the session without its prefix, and feeds it then. A retry must
repeat its request: one that adds a prefix the first call did not carry, or drops the one it
carried, is refused (INVALID_ARGUMENT), where the session knows (`Session.prefixed`: in memory,
and in its creation record, on either tier; not in a checkpoint, so not once the session has been
checkpointed, except that a prefix whose outcome is still the session's last request says the
first call carried one).
Two calls with one request id never both make a session: in one process the second waits for
the first; on two processes at once the shared tier refuses the second's creation, as long as
the first's session exists (`redis_scripts.APPEND`, `SqliteState.append`), and the second
answers with the first's session, as a retry would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from torch import Tensor

from service.engine.feed import FeedOutcome, PredictionOptions, check_request_id
from service.engine.model_input import ModelInput
from service.engine.served_versions import ServedVersions
from service.engine.session_feeder import SessionFeeder
from service.engine.session_lease import Lease, SessionLeases
from service.engine.session_lifecycle import SessionLifecycle
from service.engine.takeover import Takeover
from service.errors import InvalidArgument, SeqServeError, SessionMoved, quote
from service.runtime.sampler import SamplingParams
from service.security.principal import may_see, owner_for_new
from service.security.quotas import Quotas
from service.sessions.session import ROUTE_HEADER, Session, made_key, valid_route
from service.sessions.session_store import SessionStore


class SessionMaker:
    def __init__(
        self,
        sessions: SessionStore,
        versions: ServedVersions,
        leases: SessionLeases,
        lifecycle: SessionLifecycle,
        feeder: SessionFeeder,
        check_open: Callable[[], None],
        takeover: Takeover,
        quotas: Quotas,
    ) -> None:
        self.quotas = quotas
        self.takeover = takeover  # a retry may reach another process than the first call
        self.sessions = sessions
        self.versions = versions
        self.leases = leases
        self.lifecycle = lifecycle
        self.feeder = feeder
        self._check_open = check_open  # draining: refuse (checked again after an await)
        self._making: dict[str, asyncio.Future[None]] = {}  # creates/forks running, by request
        # Steps of prefixes whose create was cancelled inside them, by session id.
        self._stepping: dict[str, asyncio.Future[Any]] = {}

    async def create(
        self,
        model: str,
        version: str,
        seed: int | None,
        ttl_seconds: float | None,
        default_sampling: SamplingParams | None,
        prefix: ModelInput | None,
        options: PredictionOptions | None,
        request_id: str,
        route: str = "",
    ) -> tuple[Session, FeedOutcome | None]:
        """A new session, and the outcome of feeding it `prefix` (validated before the
        session exists). A retry with the same `request_id` returns the first call's. `route`
        is its routing key (random when empty)."""
        check_request_id(request_id)
        if route and not valid_route(route):
            raise InvalidArgument(
                f"routing key ({ROUTE_HEADER}) must be 1-64 characters of A-Z a-z 0-9 _ -"
            )
        key = made_key("create", request_id, owner_for_new())
        async with self._made_once(key if request_id else ""):
            made = await self._made(key) if request_id else None
            if made is not None:  # a retry: what the first call made, and its prefix's outcome
                answer = await self._retried_create(made, model, prefix, options, request_id)
                if answer is not None:
                    return answer
            try:
                return await self._create(
                    model, version, seed, ttl_seconds, default_sampling, prefix, options,
                    request_id, route,
                )  # fmt: skip
            except _MadeElsewhere:
                # The same request reached another process at once, and made its session
                # first (the tier refused this one's): answer as a retry there would.
                made = await self._made(key)
                answer = (
                    await self._retried_create(made, model, prefix, options, request_id)
                    if made is not None
                    else None
                )
                if answer is None:
                    raise
                return answer

    async def _retried_create(
        self,
        made: Session,
        model: str,
        prefix: ModelInput | None,
        options: PredictionOptions | None,
        request_id: str,
    ) -> tuple[Session, FeedOutcome | None] | None:
        """A retry's answer: what the first call made, and its prefix's outcome; None when
        that session ended (its prefix's step failed after a cancel): it is made anew."""
        if made.model != model:
            raise _reused(request_id, f"a create of model {made.model!r}")
        if prefix is not None and made.prefixed is False:
            raise _reused(request_id, "a create without a prefix")
        outcome = await self._prefix_outcome(made, request_id)
        if prefix is None and (made.prefixed or outcome is not None):
            # (A prefix's outcome under the create's id: it carried one, checkpointed or not.)
            raise _reused(request_id, "a create with a prefix")
        if prefix is not None and not made.closed and outcome is None and _unfed(made):
            return await self._prefix_of_retry(made, prefix, options, request_id)
        if made.closed:
            return None
        return made, outcome

    async def _create(
        self,
        model: str,
        version: str,
        seed: int | None,
        ttl_seconds: float | None,
        default_sampling: SamplingParams | None,
        prefix: ModelInput | None,
        options: PredictionOptions | None,
        request_id: str,
        route: str,
    ) -> tuple[Session, FeedOutcome | None]:
        ttl = self.lifecycle.ttl(ttl_seconds)
        # A prefix is input like any other; a create refused is given its charge back.
        charge = prefix.size() if prefix is not None and self.quotas.charging else 0
        async with self.quotas.new_session(self.sessions) as made_one, self.quotas.charged(charge):
            served = await self.lifecycle.version_for_new_session(model, version)
            self._check_open()
            prefix_tensor = self.feeder.inputs(served, prefix) if prefix is not None else None
            try:
                session = await self.lifecycle.create(
                    served, seed=seed, ttl_seconds=ttl, default_sampling=default_sampling,
                    request_id=request_id, route=route, prefixed=prefix is not None,
                )  # fmt: skip
            except SessionMoved as exc:  # the tier refused its creation: nothing was made
                if not request_id:
                    raise
                raise _MadeElsewhere(exc) from None
            made_one(session.session_id)  # in the step its row was written (`Quotas.new_session`)
        if prefix_tensor is None:
            return session, None
        return session, await self._feed_prefix(session, prefix_tensor, options, request_id, charge)

    async def _prefix_of_retry(
        self,
        made: Session,
        prefix: ModelInput,
        options: PredictionOptions | None,
        request_id: str,
    ) -> tuple[Session, FeedOutcome]:
        """A retry finds the session its first call made without the prefix applied: the
        first call's creation write had an unknown outcome on the shared tier (it timed out,
        and the tier ran it late), so that call failed before its prefix ran. The prefix is
        fed now, as the first call would have, under the same request id: a further retry
        finds it applied (`_prefix_outcome`)."""
        served = await self.versions.get(made.model, made.version)
        prefix_tensor = self.feeder.inputs(served, prefix)  # validated, as by the first call
        charge = prefix.size() if self.quotas.charging else 0
        await self.quotas.charge(charge)  # as the first call was (refunded when it failed)
        return made, await self._feed_prefix(made, prefix_tensor, options, request_id, charge)

    async def _feed_prefix(
        self,
        session: Session,
        prefix_tensor: Tensor,
        options: PredictionOptions | None,
        request_id: str,
        charge: int,
    ) -> FeedOutcome:
        """Feed a new session its prefix; refused or failed, the session is not left behind
        (`_leave_nothing`) and the charge goes back."""
        lease: Lease | None = None
        try:
            async with self.leases.hold(session.session_id) as lease:
                lease.request_id = request_id  # journaled with the prefix: survives a restart
                outcome = await self.feeder.run(
                    lease, prefix_tensor, options, remember_as=request_id
                )
                lease.remember(request_id, 0, outcome)
        except BaseException as exc:
            self._leave_nothing(session, lease, request_id)
            if isinstance(exc, SeqServeError):
                await self.quotas.refund(charge)
            raise
        return outcome

    def _leave_nothing(self, session: Session, lease: Lease | None, request_id: str) -> None:
        """A refused or cancelled create leaves no session behind that its client cannot name:
        ended now, or, cancelled while its prefix's step ran, once that step settles. With a
        request id, a session whose prefix that step applied stays: the retry finds it, with
        the prefix's prediction (`remember_as`); one whose prefix it did not apply (refused,
        failed) is ended, and the retry makes the session anew."""
        if session.closed:
            return
        step = lease.in_flight if lease is not None else None
        if step is None or step.done():
            if not session.busy:
                self.lifecycle.end(session, "closed")
            return
        sid = session.session_id
        if request_id:  # a retry meanwhile waits for the step (`_prefix_outcome`)
            self._stepping[sid] = step

        def settled(_step: asyncio.Future[Any]) -> None:  # after the lease's own: let go
            self._stepping.pop(sid, None)
            applied = session.position > 0  # a new session: only the prefix moves it
            if not session.closed and not session.busy and not (request_id and applied):
                self.lifecycle.end(session, "closed")

        step.add_done_callback(settled)

    async def _prefix_outcome(self, session: Session, request_id: str) -> FeedOutcome | None:
        """The outcome of the prefix a creation fed, while it is the session's last request."""
        await self.leases.replays.settle(session)  # the reply is rebuilt by its replay
        stepping = self._stepping.get(session.session_id)
        if stepping is not None:  # the first call's prefix, cancelled inside its step
            await asyncio.wait([stepping])  # settled: remembered (`remember_as`) by now
        last = session.last_request
        if last is None or last.request_id != request_id:
            return None
        outcome = last.reply
        if not isinstance(outcome, FeedOutcome):
            return None
        if outcome.tokenizer is None:  # read back from a checkpoint
            served = await self.versions.get(session.model, session.version)
            outcome.tokenizer = served.tokenizer
        return outcome

    async def fork(
        self,
        session_id: str,
        ttl_seconds: float | None = None,
        seed: int | None = None,
        request_id: str = "",
    ) -> Session:
        """A fork of the session; a retry with the same `request_id` returns the first
        call's."""
        check_request_id(request_id)
        key = made_key("fork", request_id, owner_for_new())
        async with self._made_once(key if request_id else ""):
            made = await self._made(key) if request_id else None
            if made is not None:  # a retry: the fork the first call made
                if made.parent_session_id != session_id:
                    raise _reused(request_id, "a fork of another session")
                return made
            try:
                async with self.quotas.new_session(self.sessions) as made_one:
                    child = await self.lifecycle.fork(session_id, ttl_seconds, seed, request_id)
                    made_one(child.session_id)  # in the step its row was written
                    return child
            except SessionMoved:
                # The tier refused the child's first write: the same request may have reached
                # another process at once and made its fork first; that one is the answer, as
                # to a retry. (Else the source moved: refused, retryable.)
                if not request_id:
                    raise
                made = await self._made(key)
                if made is None or made.parent_session_id != session_id:
                    raise
                return made

    async def _made(self, key: str) -> Session | None:
        """What the request `key` made: here, or on another process (the shared tier); only
        the caller's own."""
        made = self.sessions.made(key) or await self.takeover.made(key)
        return made if made is not None and may_see(made.owner) else None

    @contextlib.asynccontextmanager
    async def _made_once(self, key: str) -> AsyncIterator[None]:
        """One create or fork per request id at a time: a retry that arrives while the first
        call is still running waits for it, then finds what it made."""
        if not key:
            yield
            return
        while (running := self._making.get(key)) is not None:
            await asyncio.shield(running)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._making[key] = done
        try:
            yield
        finally:
            del self._making[key]
            done.set_result(None)


class _MadeElsewhere(SessionMoved):
    """The tier refused a create's first write: the request's session may have been made by
    another process meanwhile. (A SessionMoved: the create's charge is given back.)"""

    def __init__(self, refused: SessionMoved) -> None:
        super().__init__(refused.message)
        self.metadata = refused.metadata
        self.session_ids = refused.session_ids


def _unfed(made: Session) -> bool:
    """Nothing was fed to the session a create made: no request moved it. For a retry that
    carries a prefix, it is made without it (a retry must repeat its request, so the prefix is
    the first call's)."""
    return made.position == 0 and made.last_request is None


def _reused(request_id: str, first: str) -> InvalidArgument:
    """A request id already used by another request: its retry must be the same request."""
    return InvalidArgument(
        f"request id {quote(request_id)} was used for {first}; a retry must repeat its request, "
        "and another request needs a new id"
    )

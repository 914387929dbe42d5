"""Recovery at start-up: every session comes back at the position of its last journaled step.

The spill tier's checkpoints are indexed first (`SessionResidency.open`); then the journal is
read in order. A CREATE record starts a session that has no checkpoint yet, an END record
removes one, and each step record is replayed on top of the session's base (its checkpoint,
or a fresh state): all of a session's journaled inputs, sampled tokens included, are fed as one
chunk through the version's runner, the same step code that serves, and its random stream skips
the draws the journaled samples took. Each recovered session is then checkpointed, and the old
journal segments are dropped. A session whose records have a gap (lost or damaged) is refused
with DATA_LOSS naming it; one whose version cannot be loaded any more, likewise.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.engine.feed import FeedOutcome
from service.engine.generation import rebuilt_log
from service.engine.served_version import ServedVersion
from service.engine.served_versions import ServedVersions
from service.engine.session_residency import SessionResidency
from service.errors import SeqServeError, SessionLost, SpillMismatch, VersionGone
from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.step_batch import Row, RowResult, StepBatch
from service.sessions import journal_record as jr
from service.sessions.session import AppliedRequest, Session
from service.sessions.session_store import SessionStore

log = logging.getLogger(__name__)

_REPLAY_ROWS = 512  # sessions replayed per batched call


@dataclass
class _Plan:
    session: Session
    fresh: bool  # no checkpoint: the base is a new session's zero state
    records: list[jr.JournalRecord] = field(default_factory=list)


@dataclass
class _Batch:
    rows: list[Row] = field(default_factory=list)  # everything but the last feeds
    last_rows: list[Row] = field(default_factory=list)  # the last feeds, with their options
    # (plan, replay, index in rows, index in last_rows)
    ready: list[tuple[_Plan, _Replay, int | None, int | None]] = field(default_factory=list)
    results: list[RowResult] = field(default_factory=list)
    last_results: list[RowResult] = field(default_factory=list)
    tokenizer: ByteTokenizer | None = None
    lost: int = 0

    def add(self, slot: int, plan: _Plan, replay: _Replay) -> None:
        before, last = replay.split()
        first = None
        if before is not None:
            first = len(self.rows)
            self.rows.append(Row(slot=slot, inputs=before, top_k=1))
        index = None
        if last is not None:
            assert replay.last is not None
            index = len(self.last_rows)
            top_k, per_position = replay.last[3], replay.last[4]
            self.last_rows.append(
                Row(slot=slot, inputs=last, top_k=top_k, per_position=per_position)
            )
        self.ready.append((plan, replay, first, index))


@dataclass(frozen=True)
class RecoveryReport:
    replayed_sessions: int
    replayed_steps: int
    lost: int  # sessions refused with DATA_LOSS


class Recovery:
    def __init__(
        self, sessions: SessionStore, versions: ServedVersions, residency: SessionResidency
    ) -> None:
        self._sessions = sessions
        self._versions = versions
        self._residency = residency

    async def run(self, records: Iterable[jr.JournalRecord]) -> RecoveryReport:
        # Nothing else runs during recovery (the server is not serving yet): give the replay
        # every core, then go back to the serving setting.
        threads = torch.get_num_threads()
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        try:
            return await self._run(records)
        finally:
            torch.set_num_threads(threads)

    async def _run(self, records: Iterable[jr.JournalRecord]) -> RecoveryReport:
        plans = self._plan(records)
        by_version: dict[tuple[str, int], list[_Plan]] = {}
        for plan in plans.values():
            s = plan.session
            by_version.setdefault((s.model, s.version), []).append(plan)
        replayed = steps = lost = 0
        for (model, version), group in by_version.items():
            try:
                served = await self._versions.get(model, version)
            except SeqServeError as exc:
                why = f"its version {model}:{version} cannot be loaded: {exc.message}"
                for plan in group:
                    self._lose(plan, why, VersionGone)
                lost += len(group)
                continue
            # Pipelined: a batch computes on the runner's threads while the one before it is
            # checkpointed on this one.
            finishing: _Batch | None = None
            for start in range(0, len(group), _REPLAY_ROWS):
                batch = await self._prepare(served, group[start : start + _REPLAY_ROWS])
                lost += batch.lost
                compute = asyncio.ensure_future(self._compute(served, batch))
                if finishing is not None:
                    replayed, steps = self._finish(finishing, replayed, steps)
                await compute
                finishing = batch
            if finishing is not None:
                replayed, steps = self._finish(finishing, replayed, steps)
        return RecoveryReport(replayed, steps, lost)

    # ---- reading the journal -------------------------------------------------------------

    def _plan(self, records: Iterable[jr.JournalRecord]) -> dict[str, _Plan]:
        known: dict[str, Session] = {s.session_id: s for s in self._sessions}  # checkpoints
        plans: dict[str, _Plan] = {}
        for rec in records:
            sid = rec.session_id
            if rec.kind == jr.CREATE:
                if sid not in known and rec.meta is not None:
                    fresh = _fresh_session(sid, rec.meta, self._sessions.clock())
                    known[sid] = fresh
                    plans[sid] = _Plan(fresh, fresh=True)
                continue
            if rec.kind == jr.END:
                plans.pop(sid, None)
                gone = known.pop(sid, None)
                if gone is not None:
                    if self._sessions.contains(sid):  # adopted from a checkpoint
                        self._residency.discard(gone)
                        self._versions.unpin(gone.model, gone.version)
                    self._sessions.remove(gone, rec.why or "closed")  # its id says why
                continue
            base = known.get(sid)
            if base is None:  # neither a checkpoint nor a creation: its base is gone
                if sid not in self._sessions.broken:
                    self._sessions.mark_broken(sid, "its checkpoint is missing")
                continue
            plans.setdefault(sid, _Plan(base, fresh=False)).records.append(rec)
        return plans

    # ---- replaying -----------------------------------------------------------------------

    async def _prepare(self, served: ServedVersion, plans: list[_Plan]) -> _Batch:
        """Slots for the sessions with steps to replay, their base state restored."""
        cfg = served.config
        batch = _Batch()
        for plan in plans:
            session = plan.session
            if session.fingerprint != served.fingerprint:
                self._lose(
                    plan,
                    f"it was journaled for weights {session.fingerprint}, but {model_of(served)} "
                    f"now has {served.fingerprint}",
                    SpillMismatch,
                )
                batch.lost += 1
                continue
            replay = _replay_of(plan, session.position, cfg.input_kind, cfg.input_dim)
            if replay.problem is not None:
                self._lose(plan, replay.problem)
                batch.lost += 1
                continue
            if plan.fresh:
                self._sessions.adopt(session)
                self._versions.pin(session.model, session.version)
            if replay.empty:  # nothing after its base: a fresh session never fed
                if plan.fresh:
                    slot = await self._residency.allocate(served)
                    self._sessions.set_slot(session, slot)
                    self._residency.spill(session)
                continue
            slot = await self._residency.allocate(served)
            if not plan.fresh:
                served.pool.restore(slot, self._residency.tier.read(session.session_id).state)
            self._sessions.set_slot(session, slot)
            batch.add(slot, plan, replay)
        return batch

    async def _compute(self, served: ServedVersion, batch: _Batch) -> None:
        def run() -> None:  # the last requests' rows after the rest: they need the state before
            if batch.rows:
                batch.results = served.runner.execute(StepBatch(batch.rows)).results
            if batch.last_rows:
                batch.last_results = served.runner.execute(StepBatch(batch.last_rows)).results

        await asyncio.to_thread(run)
        batch.tokenizer = served.tokenizer

    def _finish(self, batch: _Batch, replayed: int, steps: int) -> tuple[int, int]:
        """Count the replayed steps, skip the RNG draws, rebuild each session's last request,
        write its checkpoint."""
        total = 0
        for plan, replay, first, last in batch.ready:
            session = plan.session
            consumed = batch.results[first].consumed if first is not None else 0
            result = batch.last_results[last] if last is not None else None
            consumed += result.consumed if result is not None else 0
            self._sessions.advance(session, consumed)
            total += consumed
            session.rng.skip(replay.draws)
            self._sessions.remember(session, replay.applied(session, result, batch.tokenizer))
            self._sessions.touch(session)  # used until the crash: its idle clock restarts
            self._residency.spill(session)  # the new checkpoint; the slot is free again
        return replayed + len(batch.ready), steps + total

    def _lose(self, plan: _Plan, why: str, error: type[SeqServeError] = SessionLost) -> None:
        session = plan.session
        log.error("session %s cannot be recovered: %s", session.session_id, why)
        if self._sessions.contains(session.session_id):
            self._residency.discard(session)
            self._sessions.remove(session, "lost")
            self._versions.unpin(session.model, session.version)
        self._sessions.mark_broken(session.session_id, why, error)


@dataclass
class _Replay:
    """What to replay for one session: its inputs after its base, the last request (rebuilt
    for exactly-once retries) split off when it was a feed."""

    kind: str
    dim: int
    parts: list[bytes] = field(default_factory=list)
    draws: int = 0
    problem: str | None = None
    # The last request after the base: ("feed", id, position, top_k, per_position, part index)
    # or ("generate", id, position, sampling, [tokens], first token's position); None when the
    # last one had no id; absent (the checkpoint's stands) when there were no records.
    last: tuple[Any, ...] | None = None
    seen_request: bool = False

    @property
    def empty(self) -> bool:
        return not self.parts

    def tensor(self, parts: list[bytes]) -> torch.Tensor | None:
        if not parts:
            return None
        if self.kind == "tokens":
            return torch.from_numpy(np.frombuffer(b"".join(parts), dtype="<i4").astype(np.int64))
        values = np.frombuffer(b"".join(parts), dtype="<f4").copy()
        return torch.from_numpy(values).view(-1, self.dim)

    def split(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the inputs before the last request, the last request's) when it was a feed."""
        if self.last is not None and self.last[0] == "feed":
            at = self.last[5]
            return self.tensor(self.parts[:at]), self.tensor(self.parts[at:])
        return self.tensor(self.parts), None

    def applied(
        self, session: Session, result: RowResult | None, tokenizer: ByteTokenizer | None
    ) -> AppliedRequest | None:
        if not self.seen_request:  # no records after the checkpoint: its own stands
            return session.last_request
        if self.last is None:
            return None
        if self.last[0] == "feed":
            assert result is not None and result.prediction is not None
            outcome = FeedOutcome(
                session, session.position, result.prediction, result.per_position, tokenizer
            )
            return AppliedRequest(self.last[1], self.last[2], outcome)
        _, request_id, position, sampling, tokens, first = self.last
        if tokenizer is None:
            return None
        params = SamplingParams.from_dict(sampling)
        return AppliedRequest(request_id, position, rebuilt_log(params, tokenizer, tokens, first))


def _replay_of(plan: _Plan, base: int, kind: str, dim: int) -> _Replay:
    """The session's records after `base`, checked for gaps (records were lost)."""
    replay = _Replay(kind, dim)
    position = base
    for rec in plan.records:
        if rec.kind == jr.GEN_START:
            if rec.position >= base:
                replay.seen_request = True
                replay.last = ("generate", rec.request_id, rec.position, rec.meta or {}, [], None)
            continue
        n = rec.n // dim if rec.kind == jr.FRAMES else rec.n
        if rec.position + n <= base:
            continue  # already in the checkpoint
        if rec.position != position:
            replay.problem = f"its journal has a gap at position {position} (records were lost)"
            return replay
        replay.seen_request = True
        last = replay.last
        generating = last is not None and last[0] == "generate" and last[1] == rec.request_id
        if rec.kind == jr.GENERATED:
            if generating and last is not None:
                last[4].append(int(np.frombuffer(rec.data, dtype="<i4")[0]))
                if last[5] is None:
                    replay.last = (*last[:5], rec.position + 1)
            else:
                replay.last = None
        elif not (generating and last is not None and not last[4]):  # not a generation's prompt
            feed = ("feed", rec.request_id, rec.position, rec.top_k, rec.per_position)
            replay.last = (*feed, len(replay.parts)) if rec.request_id else None
        replay.parts.append(rec.data)
        position += n
        replay.draws += rec.draws
    return replay


def _fresh_session(session_id: str, meta: dict, clock_now: float) -> Session:  # type: ignore[type-arg]
    sampling = meta.get("default_sampling") or {}
    return Session(
        session_id=session_id,
        model=meta["model"],
        version=int(meta["version"]),
        fingerprint=meta["fingerprint"],
        slot=None,
        rng=SessionRng.seeded(int(meta["seed"])),
        default_sampling=SamplingParams.from_dict(sampling),
        ttl_seconds=float(meta["ttl_seconds"]),
        created_at=float(meta["created_at"]),
        last_used=clock_now,
        seed=int(meta["seed"]),
        parent_session_id=meta.get("parent_session_id", ""),
        made_by=meta.get("made_by", ""),
    )


def model_of(served: ServedVersion) -> str:
    return f"{served.name}:{served.version}"

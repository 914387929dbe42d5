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

import numpy as np
import torch

from service.engine.served_version import ServedVersion
from service.engine.served_versions import ServedVersions
from service.engine.session_residency import SessionResidency
from service.errors import SeqServeError
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.step_batch import Row, StepBatch
from service.sessions import journal_record as jr
from service.sessions.session import Session
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
    rows: list[Row] = field(default_factory=list)
    ready: list[tuple[_Plan, int]] = field(default_factory=list)  # (plan, RNG draws)
    consumed: list[int] = field(default_factory=list)  # per row, once computed
    lost: int = 0


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
                for plan in group:
                    self._lose(plan, f"its version {model}:{version} cannot be loaded: {exc}")
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
                self._lose(plan, "it was journaled for other weights")
                batch.lost += 1
                continue
            inputs, draws, problem = _inputs(plan, session.position, cfg.input_kind, cfg.input_dim)
            if problem is not None:
                self._lose(plan, problem)
                batch.lost += 1
                continue
            if plan.fresh:
                self._sessions.adopt(session)
                self._versions.pin(session.model, session.version)
            if inputs is None:  # nothing after its base: a fresh session never fed
                if plan.fresh:
                    slot = await self._residency.allocate(served)
                    self._sessions.set_slot(session, slot)
                    self._residency.spill(session)
                continue
            slot = await self._residency.allocate(served)
            if not plan.fresh:
                served.pool.restore(slot, self._residency.tier.read(session.session_id).state)
            self._sessions.set_slot(session, slot)
            batch.rows.append(Row(slot=slot, inputs=inputs, top_k=1))
            batch.ready.append((plan, draws))
        return batch

    async def _compute(self, served: ServedVersion, batch: _Batch) -> None:
        if batch.rows:
            output = await asyncio.to_thread(served.runner.execute, StepBatch(batch.rows))
            batch.consumed = [r.consumed for r in output.results]

    def _finish(self, batch: _Batch, replayed: int, steps: int) -> tuple[int, int]:
        """Count the replayed steps, skip the RNG draws, write each session's checkpoint."""
        for (plan, draws), consumed in zip(batch.ready, batch.consumed, strict=True):
            session = plan.session
            self._sessions.advance(session, consumed)
            session.rng.skip(draws)
            self._sessions.touch(session)  # used until the crash: its idle clock restarts
            self._residency.spill(session)  # the new checkpoint; the slot is free again
        return replayed + len(batch.ready), steps + sum(batch.consumed)

    def _lose(self, plan: _Plan, why: str) -> None:
        session = plan.session
        log.error("session %s cannot be recovered: %s", session.session_id, why)
        if self._sessions.contains(session.session_id):
            self._residency.discard(session)
            self._sessions.remove(session, "lost")
            self._versions.unpin(session.model, session.version)
        self._sessions.mark_broken(session.session_id, why)


def _inputs(
    plan: _Plan, base: int, kind: str, dim: int
) -> tuple[torch.Tensor | None, int, str | None]:
    """The session's inputs after `base`, as one chunk; the RNG draws they took; or why the
    records cannot be replayed (a gap: records were lost)."""
    parts: list[bytes] = []
    position, draws = base, 0
    for rec in plan.records:
        n = rec.n // dim if rec.kind == jr.FRAMES else rec.n
        if rec.position + n <= base:
            continue  # already in the checkpoint
        if rec.position != position:
            return None, 0, f"its journal has a gap at position {position} (records were lost)"
        parts.append(rec.data)
        position += n
        draws += rec.draws
    if not parts:
        return None, 0, None
    if kind == "tokens":
        ids = np.frombuffer(b"".join(parts), dtype="<i4").astype(np.int64)
        return torch.from_numpy(ids), draws, None
    values = np.frombuffer(b"".join(parts), dtype="<f4").copy()
    return torch.from_numpy(values).view(-1, dim), draws, None


def _fresh_session(session_id: str, meta: dict, clock_now: float) -> Session:  # type: ignore[type-arg]
    sampling = meta.get("default_sampling") or {}
    return Session(
        session_id=session_id,
        model=meta["model"],
        version=int(meta["version"]),
        fingerprint=meta["fingerprint"],
        slot=None,
        rng=SessionRng.seeded(int(meta["seed"])),
        default_sampling=SamplingParams(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in sampling.items()}  # type: ignore[arg-type]
        ),
        ttl_seconds=float(meta["ttl_seconds"]),
        created_at=float(meta["created_at"]),
        last_used=clock_now,
        seed=int(meta["seed"]),
        parent_session_id=meta.get("parent_session_id", ""),
    )

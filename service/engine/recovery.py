"""Recovery at start-up: every session comes back at the position of its last journaled step.

The spill tier's checkpoints are indexed first (`SessionResidency.open`); then the journal is
read in order. A CREATE record starts a session that has no checkpoint yet, an END record
removes one, and each step record joins its session's replay. Before the server reports
SERVING, each session with records after its base (its checkpoint, or a fresh state) is checked
(no gap in its positions, its version loads, its weights are the ones it was journaled for),
put at its final position with its random stream moved on past the journaled draws, and handed
to `PendingReplays`, which computes its state in the background or when a request needs it
first (`replay.py`). A session whose records have a gap (lost or damaged) is refused with
DATA_LOSS naming it, and so is one whose last record is damaged with whole records after it
(`Journal.open` reports it in place, and its head still names the session): later writes
reached the disk whole, so its step was most likely synced and acknowledged, and coming back a
step short would pass for the truth. (A segment's whole last record failing its checksum is
dropped there: a power loss's unsynced write looks the same.) One journaled for other weights
is refused with FAILED_PRECONDITION. One whose version cannot be loaded now is refused
(VersionGone) and held: its checkpoint stays, and its
records are copied into a journal segment of their own (`Journal.hold`), so it comes back at a
restart once the store has its version again, without keeping the segments they came from.
A session with a record a newer seqserve wrote (a downgrade) is refused (WrittenByNewer) and
kept the same way, its newer records as they were written (`newer_records`), rather than
brought back short of them.

A checkpointed session whose CREATE record the journal still holds, with every step since, has
that whole history handed to `PendingReplays` too: its checkpoint is read there (also when
nothing was journaled since it), and a damaged one is rebuilt from the history instead of
refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from service.engine.checkpoint_header import session_from
from service.engine.newer_records import NewerRecords
from service.engine.recovery_plan import (
    Plan,
    damage,
    damaged_last,
    encoded,
    fresh_session,
    needs_replay,
    only_checked,
    whole_history,
)
from service.engine.replay import PendingReplays, lose
from service.engine.replay_plan import replay_of
from service.engine.served_version import ServedVersion
from service.engine.served_versions import ServedVersions
from service.engine.session_residency import SessionResidency
from service.errors import SeqServeError, SessionLost, SpillMismatch, VersionGone
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions.journal import Journal
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.spill_record import SpillRecord
from service.sessions.spill_tier import SpillTier
from service.sessions.state_tier import JournalLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    pending_sessions: int  # sessions with steps to replay (or a first checkpoint to write)
    pending_steps: int
    lost: int  # sessions refused


class Recovery:
    def __init__(
        self,
        sessions: SessionStore,
        versions: ServedVersions,
        residency: SessionResidency,
        replays: PendingReplays,
    ) -> None:
        self._sessions = sessions
        self._versions = versions
        self._residency = residency
        self._replays = replays

    async def from_journal(self, journal: JournalLog) -> RecoveryReport:
        """Start-up: every session back at its last journaled step (its replay pending), then
        the journal writing its next segment, without the segments nobody needs. The ends the
        journal kept past their END records (`Journal.ended_sessions`) are read first, as END
        records older than any it has; what the process then remembers of why sessions ended
        is kept before a segment is deleted."""
        kept = await asyncio.to_thread(journal.ended_sessions)
        ends = (
            jr.JournalRecord(jr.END, sid, 0, why=why, meta={"owner": owner} if owner else None)
            for sid, why, owner in kept
        )
        records = await asyncio.to_thread(lambda: list(journal.open()))
        report = await self.run(itertools.chain(ends, records), journal.oldest)
        del records, kept
        await asyncio.to_thread(journal.keep_ended, self._sessions.gone.remembered())
        journal.start()
        if not self._replays:  # nothing left to replay: every session is in a checkpoint
            # Off the loop: it flushes the checkpoints' filesystem first (`Journal`).
            await asyncio.to_thread(journal.drop_before, journal.segment)
        if report.pending_sessions or report.lost:
            log.info(
                "recovered %d sessions from the journal (%d steps to replay, in the "
                "background or when first used; %d lost)",
                report.pending_sessions, report.pending_steps, report.lost,
            )  # fmt: skip
        self._replays.start()
        return report

    async def run(
        self, records: Iterable[jr.JournalRecord | js.Unreadable], oldest_segment: int
    ) -> RecoveryReport:
        """Plan every session's replay; their journal records stay (`oldest_segment` pinned)
        until each has a new checkpoint."""
        known = {s.session_id: s for s in self._sessions}  # from their checkpoints
        newer = NewerRecords(self._sessions)
        plans = self._plan(records, known, histories=True, newer=newer)
        return await self._recover(plans, oldest_segment, newer)

    async def take_over(
        self,
        session_id: str,
        checkpoint: SpillRecord | None,
        records: list[jr.JournalRecord],
        epoch: int,
    ) -> None:
        """One session read from the shared tier (its checkpoint, its journal since) becomes
        this replica's, at `epoch`: at its position, its replay pending as after a restart."""
        known: dict[str, Session] = {}
        if checkpoint is not None:
            header = checkpoint.header
            session = session_from(header, self._sessions.clock())
            self._sessions.set_epoch(session, epoch)
            self._residency.adopt(session, header)
            known[session_id] = session
        plans = self._plan(records, known)
        for plan in plans.values():
            self._sessions.set_epoch(plan.session, epoch)
        await self._recover(plans, 0)

    async def describe(
        self, session_id: str, checkpoint: SpillRecord | None, records: list[jr.JournalRecord]
    ) -> Session | None:
        """The session the tier holds, as a detached copy at its journaled position (None when
        its records say nothing usable): what GetSession answers on a replica not holding it."""
        base = None
        if checkpoint is not None:
            base = session_from(checkpoint.header, self._sessions.clock())
        else:
            create = next((r for r in records if r.kind == jr.CREATE and r.meta), None)
            if create is not None and create.meta is not None:
                base = fresh_session(session_id, create.meta, self._sessions.clock())
        if base is None:
            return None
        served = await self._versions.get(base.model, base.version)
        cfg = served.config
        replay = replay_of(records, base.position, cfg.input_kind, cfg.input_dim)
        return dataclasses.replace(base, position=replay.end)

    async def _recover(
        self, plans: dict[str, Plan], oldest_segment: int, newer: NewerRecords | None = None
    ) -> RecoveryReport:
        """Check and pend each plan; the records of the sessions refused as a `newer`
        server's are held with those of the sessions whose version does not load."""
        by_version: dict[tuple[str, int], list[Plan]] = {}
        pending = steps = lost = 0
        for plan in plans.values():
            if plan.damaged is not None:
                self._lose(plan, damage(plan.damaged))
                lost += 1
                continue
            if not needs_replay(plan):
                continue  # its checkpoint holds every journaled step: nothing to load or check
            s = plan.session
            by_version.setdefault((s.model, s.version), []).append(plan)
        held: list[Plan] = []
        for (model, version), group in by_version.items():
            try:
                served = await self._versions.get(model, version)
            except SeqServeError as exc:
                why = f"its version {model}:{version} cannot be loaded: {exc.message}"
                group = [plan for plan in group if not only_checked(plan)]
                for plan in group:
                    self._hold(plan, why)
                held += group
                lost += len(group)
                continue
            for plan in group:
                got = self._pend(served, plan, oldest_segment)
                if got is None:
                    lost += 1
                else:
                    pending += got > 0 or plan.fresh
                    steps += got
        records = {plan.session.session_id: encoded(plan) for plan in held}
        self._keep({**records, **(newer.held() if newer is not None else {})}, oldest_segment)
        return RecoveryReport(pending, steps, lost)

    # ---- reading the journal -------------------------------------------------------------

    def _plan(
        self,
        records: Iterable[jr.JournalRecord | js.Unreadable],
        known: dict[str, Session],
        *,
        histories: bool = False,
        newer: NewerRecords | None = None,
    ) -> dict[str, Plan]:
        """Each session's plan. `histories`: keep the CREATE record of a session with a
        checkpoint too (the local journal at start-up), so its whole history can rebuild it.
        `newer`: where the sessions with a newer server's record (the local journal's) go,
        refused; without it such records are skipped."""
        plans: dict[str, Plan] = {}
        # Each session's last record kept: (its position, what it was). A session's records
        # come in step order, so one behind it, or the same again, is a copy: the records of a
        # session held at an earlier recovery are copied into a segment of their own, and a
        # crash before the segments they came from were trimmed leaves both to read.
        last: dict[str, tuple[int, tuple[Any, ...]]] = {}
        # Damaged records by the session their head names, until a readable record of it
        # follows (then a gap shows what is missing, as for any lost record).
        damaged: dict[str, js.Unreadable] = {}
        whole: set[str] = set()  # sessions with a record read whole (so a CREATE is behind)
        for rec in records:
            if isinstance(rec, js.Unreadable):
                if rec.what == js.NEWER:
                    if newer is not None:
                        newer.newer(rec, known, plans)
                    continue
                if rec.session_id and rec.kind != jr.GEN_START:  # one alone changed nothing
                    damaged[rec.session_id] = rec
                continue
            sid = rec.session_id
            whole.add(sid)
            if newer is not None:
                newer.follow(rec)
            if damaged and rec.kind != jr.GEN_START:  # replays skip it: it shows no gap
                damaged.pop(sid, None)
            if rec.kind == jr.CREATE:
                if sid not in known and rec.meta is not None:
                    fresh = fresh_session(sid, rec.meta, self._sessions.clock())
                    known[sid] = fresh
                    plans[sid] = Plan(fresh, fresh=True, create=rec)
                elif histories and sid in known and rec.meta is not None:
                    plans.setdefault(sid, Plan(known[sid], fresh=False)).create = rec
                continue
            if rec.kind == jr.END:
                plans.pop(sid, None)
                self._drop_refused_record(sid)
                gone = known.pop(sid, None)
                if gone is None:  # its owner is known only from what the journal kept
                    owner = rec.meta.get("owner", "") if rec.meta else ""
                    self._sessions.ended_earlier(sid, rec.why or "closed", owner)
                else:
                    if self._sessions.contains(sid):  # adopted from a checkpoint
                        self._residency.discard(gone)
                        self._versions.unpin(gone.model, gone.version)
                    self._sessions.remove(gone, rec.why or "closed")  # its id says why
                continue
            base = known.get(sid)
            if base is None:  # neither a checkpoint nor a creation: its base is gone
                if sid not in self._sessions.broken and not (newer is not None and sid in newer):
                    self._sessions.mark_broken(sid, "its checkpoint is missing")
                continue
            what = (rec.kind, rec.request_id, rec.data, rec.draws)
            before = last.get(sid)
            if before is not None and (
                rec.position < before[0] or (rec.position == before[0] and what == before[1])
            ):
                continue  # a copy of a record already read
            last[sid] = (rec.position, what)
            plans.setdefault(sid, Plan(base, fresh=False)).records.append(rec)
        for sid, bad in damaged.items():
            damaged_last(self._sessions, plans, known, bad, first=sid not in whole)
        if newer is not None:
            newer.refuse(plans, known, self._versions)
        return plans

    def _drop_refused_record(self, session_id: str) -> None:
        """A session whose spill record was refused at this start, then found ended by its END
        record: the record goes (it is no longer refused, so neither a close nor the expiry of
        refused sessions would free it). Only in the local spill tier, this process's own."""
        tier = self._residency.tier
        if session_id in self._sessions.broken and isinstance(tier, SpillTier):
            tier.delete(session_id)

    def _pend(self, served: ServedVersion, plan: Plan, oldest_segment: int) -> int | None:
        """Put the session at its journaled position, its replay pending; the steps to replay
        (0: only a first checkpoint to write, or nothing), or None when it is lost."""
        session = plan.session
        if session.fingerprint != served.fingerprint:
            if only_checked(plan):
                return 0
            self._lose(
                plan,
                f"it was journaled for weights {session.fingerprint}, but "
                f"{served.name}:{served.version} now has {served.fingerprint}",
                SpillMismatch,
            )
            return None
        cfg = served.config
        replay = replay_of(
            plan.records, session.position, cfg.input_kind, cfg.input_dim, session.last_request
        )
        if replay.problem is not None:
            self._lose(plan, replay.problem)
            return None
        history = whole_history(plan, replay, cfg.input_kind, cfg.input_dim)
        if plan.fresh:
            self._sessions.adopt(session)
            self._versions.pin(session.model, session.version)
        elif replay.empty:
            if history is None:
                return 0  # everything journaled is in its checkpoint already
            # Only its checkpoint to read, in the background or on first use (its state is
            # checked there only). Nothing was journaled since: it is not replaying, and its
            # idle clock runs on (it may expire before it is read).
            self._residency.durability.journaled(session, oldest_segment, steps=0)  # a pin
            self._replays.add(session, replay, fresh=False, history=history)
            return 0
        self._sessions.advance(session, replay.end - replay.base)
        session.rng.skip(replay.draws)
        self._sessions.touch(session)  # used until the crash: its idle clock restarts
        self._sessions.set_replay_pending(session, True)
        self._residency.durability.journaled(session, oldest_segment, steps=0)  # a pin
        self._replays.add(session, replay, fresh=plan.fresh, history=history)
        return replay.end - replay.base

    def _lose(self, plan: Plan, why: str, error: type[SeqServeError] = SessionLost) -> None:
        lose(self._sessions, self._residency, plan.session, why, error)

    def _hold(self, plan: Plan, why: str) -> None:
        """Refuse a session whose version cannot be loaded now (VersionGone), keeping what it
        is made of: its checkpoint stays in the tier and its records in the journal (`_keep`),
        so it comes back at a restart once the store holds the version again. Closing it
        deletes them."""
        session = plan.session
        log.error("session %s cannot be recovered now: %s", session.session_id, why)
        if self._sessions.contains(session.session_id):  # adopted from its checkpoint
            self._sessions.remove(session, "lost")
            self._versions.unpin(session.model, session.version)
        self._sessions.mark_broken(session.session_id, why, VersionGone, owner=session.owner)

    def _keep(self, records: dict[str, list[bytes]], oldest_segment: int) -> None:
        """Keep the journal records of the sessions held (and of those refused for a newer
        server's record): copied into a segment of their own (a held session gets no new
        record, so that is all it needs; the segments read are trimmed as usual), or, where
        that segment cannot be written, every segment read (pinned: none is trimmed until the
        next start)."""
        journal = self._residency.durability.journal
        if not records or journal is None or not oldest_segment:
            return
        if not (isinstance(journal, Journal) and journal.hold(records)):
            journal.pin(oldest_segment)

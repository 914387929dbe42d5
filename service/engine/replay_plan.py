"""What a session's journal says to replay: its inputs after its base (checked for gaps), the
random draws its samples took, and its last request (to rebuild the reply an exactly-once retry
gets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.engine.feed import FeedOutcome
from service.engine.generation import GenerationLog, rebuilt_log
from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams
from service.runtime.step_batch import RowResult
from service.sessions import journal_record as jr
from service.sessions.session import AppliedRequest, Session


@dataclass
class Replay:
    """What to replay for one session: its inputs after its base, the last request (rebuilt
    for exactly-once retries) split off when it was a feed."""

    kind: str
    dim: int
    base: int = 0  # the position of the base state
    end: int = 0  # the position after the last record
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

    def array(self, parts: list[bytes]) -> np.ndarray | None:
        """The inputs of `parts`: [T] int64 tokens or [T, D] float32 frames."""
        if not parts:
            return None
        if self.kind == "tokens":
            return np.frombuffer(b"".join(parts), dtype="<i4").astype(np.int64)
        return np.frombuffer(b"".join(parts), dtype="<f4").reshape(-1, self.dim).copy()

    def split(self) -> tuple[list[np.ndarray], np.ndarray | None]:
        """(the inputs of each step before the last request, the last request's) when it was
        a feed. Step by step: replay runs each through the kernel its live step ran."""
        at = len(self.parts)
        if self.last is not None and self.last[0] == "feed":
            at = self.last[5]
        earlier = [self.array([part]) for part in self.parts[:at]]
        return [x for x in earlier if x is not None], self.array(self.parts[at:])

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
                session.position, result.prediction, result.per_position, tokenizer
            )
            return AppliedRequest(self.last[1], self.last[2], outcome)
        _, request_id, position, sampling, tokens, first = self.last
        if tokenizer is None:
            return None
        params = SamplingParams.from_dict(sampling)
        return AppliedRequest(request_id, position, rebuilt_log(params, tokenizer, tokens, first))


def replay_of(
    records: list[jr.JournalRecord],
    base: int,
    kind: str,
    dim: int,
    checkpointed: AppliedRequest | None = None,
) -> Replay:
    """A session's records after `base`, checked for gaps (records were lost). `checkpointed`:
    the last request its base (a checkpoint) holds, which its records may go on with."""
    replay = Replay(kind, dim, base=base, end=base)
    position = base
    # A generation the checkpoint holds unfinished, when a retry goes on with it: its tokens
    # after the base come as GENERATED records of its request id with no GEN_START of their
    # own (the retry writes none; the GEN_START, if still journaled, is behind the base).
    going_on = _unfinished_generation(checkpointed, base)
    # A GEN_START is written before its prompt runs: it is the last request only once a step
    # of its own follows it (`_started`); one whose prompt was never applied (its step failed,
    # or its call went away before the row entered a step) changed nothing, as in memory.
    started: jr.JournalRecord | None = None
    for rec in records:
        if rec.kind == jr.GEN_START:
            started = rec if rec.position >= base else None
            continue
        n = rec.n // dim if rec.kind == jr.FRAMES else rec.n
        if rec.position + n <= base:
            continue  # already in the checkpoint
        if rec.position != position:
            replay.problem = f"its journal has a gap at position {position} (records were lost)"
            return replay
        if started is not None and _started(started, rec):
            replay.last = ("generate", rec.request_id, rec.position, started.meta or {}, [], None)
        elif (
            going_on is not None
            and not replay.seen_request
            and rec.kind == jr.GENERATED
            and rec.request_id == going_on[1]
        ):
            replay.last = going_on  # its first record after the base: the same generation
        started = None
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
    replay.end = position
    return replay


def _started(start: jr.JournalRecord, rec: jr.JournalRecord) -> bool:
    """Whether `rec`, the step after the GEN_START `start`, is that generation's own (its
    prompt, or its first token without one): same request id, from where it started."""
    return rec.request_id == start.request_id and rec.position == start.position


def _unfinished_generation(applied: AppliedRequest | None, base: int) -> tuple[Any, ...] | None:
    """`applied`, the last request a checkpoint at `base` holds, as a replay's last request
    (see `Replay.last`) when it is a generation not finished whose last step reached `base`
    (its next token's step starts there); else None."""
    if applied is None or not applied.request_id:
        return None
    log = applied.reply
    if not isinstance(log, GenerationLog) or log.finished:
        return None
    if log.tokens and log.tokens[-1].position != base:
        return None
    tokens = [t.token_id for t in log.tokens]
    first = log.tokens[0].position if log.tokens else None
    return ("generate", applied.request_id, applied.position, log.params.as_dict(), tokens, first)

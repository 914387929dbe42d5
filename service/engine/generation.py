"""A running generation: the sampling settings, stop conditions and the token stream to its
consumer. The scheduler keeps it in the batch step after step until it finishes or is cancelled,
then retires it: `retired` resolves once no step will touch the session's slot again, and the
session's lease is let go only then."""

from __future__ import annotations

import asyncio
import codecs
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams
from service.runtime.step_batch import Row

if TYPE_CHECKING:
    from service.engine.session_lease import Lease

FINISH_STOP_TOKEN = "stop_token"
FINISH_STOP_STRING = "stop_string"
FINISH_MAX_TOKENS = "max_tokens"


@dataclass
class GenerationLog:
    """What a generation has applied so far: a retry sends these tokens again and continues."""

    params: SamplingParams
    tokens: list[GeneratedToken] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # the text this token completes (UTF-8 pieces may span tokens, so can be "")
    position: int  # the session's position after consuming it
    finish_reason: str | None  # set on the last token


class Generation:
    def __init__(
        self,
        lease: Lease,
        sampling: SamplingParams,
        tokenizer: ByteTokenizer,
        log: GenerationLog | None = None,
    ) -> None:
        self.lease = lease
        self.sampling = sampling
        self.log = log if log is not None else GenerationLog(sampling)
        self.tokens: asyncio.Queue[GeneratedToken | BaseException] = asyncio.Queue()
        self.retired: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.cancelled = False
        self.finished = False
        self.count = 0
        self.started_at = time.perf_counter()
        self.last_token_at: float | None = None
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = ""  # recent text, long enough to spot any stop string
        self._tail_len = max((len(s) for s in sampling.stop_strings), default=0)
        if self.log.tokens:  # a retry continues: count and stop-string window carry on
            self.count = len(self.log.tokens)
            self._tail = (
                "".join(t.text for t in self.log.tokens)[-self._tail_len :]
                if self._tail_len
                else ""
            )

    def row(self) -> Row:
        """This generation's row of the next step: sample from the last output, consume it."""
        session = self.lease.session
        assert session.slot is not None, "a generating session stays in memory"
        return Row(slot=session.slot, inputs=None, sampling=self.sampling, rng=session.rng)

    def retire(self) -> None:
        """No step will touch this generation's row again (called by the scheduler)."""
        if not self.retired.done():
            self.retired.set_result(None)

    @property
    def owner(self) -> Lease:
        """The row's owner for the scheduler: journal record, position."""
        return self.lease

    def advance(self, token: int, consumed: int, segment: int | None = None) -> GeneratedToken:
        """Record one sampled token the step consumed into the state (journaled in `segment`);
        decide whether the generation ends with it."""
        position = self.lease.advance(consumed, segment)
        self.count += 1
        text = (
            self._decoder.decode(bytes([token]))
            if self._tokenizer.name == "bytes"
            else (self._tokenizer.decode([token]))
        )
        reason: str | None = None
        if token in self.sampling.stop_token_ids:
            reason = FINISH_STOP_TOKEN
        elif self._tail_len:
            self._tail = (self._tail + text)[-(self._tail_len + len(text)) :]
            if any(s in self._tail for s in self.sampling.stop_strings):
                reason = FINISH_STOP_STRING
        if reason is None and self.count >= self.sampling.max_tokens:
            reason = FINISH_MAX_TOKENS
        if reason is not None:
            text += self._decoder.decode(b"", final=True)
            self.finished = True
        generated = GeneratedToken(token, text, position, reason)
        self.log.tokens.append(generated)
        self.log.finished = self.finished
        return generated

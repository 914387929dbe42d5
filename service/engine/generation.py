"""A running generation: the sampling settings, stop conditions and the token stream to its
consumer. The scheduler keeps it in the batch step after step until it finishes or is cancelled,
then retires it: `retired` resolves once no step will touch the session's slot again, and the
session's lease is let go only then."""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.engine.channel import Channel
from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams
from service.runtime.step_batch import Head, Row

if TYPE_CHECKING:
    from service.engine.session_lease import Lease

FINISH_STOP_TOKEN = "stop_token"
FINISH_STOP_STRING = "stop_string"
FINISH_MAX_TOKENS = "max_tokens"

_ASCII = tuple(chr(b) for b in range(0x80))


@dataclass
class GenerationLog:
    """What a generation has applied so far: a retry sends these tokens again and continues."""

    params: SamplingParams
    tokens: list[GeneratedToken] = field(default_factory=list)
    finished: bool = False


@dataclass(slots=True)  # not frozen: its __init__ would cost 4x (one is built per token)
class GeneratedToken:
    token_id: int
    text: str  # the text this token completes (UTF-8 pieces may span tokens, so can be "")
    position: int  # the session's position after consuming it
    finish_reason: str | None  # set on the last token


class TokenText:
    """A generation's tokens as text, and when it ends (stop token, stop string, max_tokens),
    recorded in its log. Needs no session: recovery rebuilds a journaled generation's log with
    it."""

    def __init__(
        self, sampling: SamplingParams, tokenizer: ByteTokenizer, log: GenerationLog
    ) -> None:
        self.sampling = sampling
        self.log = log
        self._tokenizer = tokenizer
        self._bytes = tokenizer.name == "bytes"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._mid = False  # the decoder holds the first bytes of a character
        self._tail_len = max((len(s) for s in sampling.stop_strings), default=0)
        self._tail = ""  # recent text, long enough to spot any stop string
        if log.tokens and self._bytes:  # a retry continues: the decoder where it was
            # The bytes of a character not yet complete are held back (its tokens' text is
            # ""): a fresh decoder would drop them, and the next token's text, and a stop
            # string spanning it, would differ from the uninterrupted generation's.
            self._decoder.decode(bytes(t.token_id for t in log.tokens))
            self._mid = bool(self._decoder.getstate()[0])
        if log.tokens and self._tail_len:  # the stop-string window too
            self._tail = "".join(t.text for t in log.tokens)[-self._tail_len :]

    def add(self, token: int, position: int) -> GeneratedToken:
        """Record one token the session consumed (reaching `position`)."""
        if not self._bytes:
            text = self._tokenizer.decode([token])
        elif token < 0x80 and not self._mid:  # ASCII between characters: itself (most tokens)
            text = _ASCII[token]
        else:
            text = self._decoder.decode(bytes((token,)))
            self._mid = bool(self._decoder.getstate()[0])
        reason: str | None = None
        if token in self.sampling.stop_token_ids:
            reason = FINISH_STOP_TOKEN
        elif self._tail_len:
            self._tail = (self._tail + text)[-(self._tail_len + len(text)) :]
            if any(s in self._tail for s in self.sampling.stop_strings):
                reason = FINISH_STOP_STRING
        if reason is None and len(self.log.tokens) + 1 >= self.sampling.max_tokens:
            reason = FINISH_MAX_TOKENS
        if reason is not None:
            text += self._decoder.decode(b"", final=True)
        generated = GeneratedToken(token, text, position, reason)
        self.log.tokens.append(generated)
        self.log.finished = reason is not None
        return generated


def rebuilt_log(
    sampling: SamplingParams, tokenizer: ByteTokenizer, tokens: list[int], first_position: int
) -> GenerationLog:
    """The log of a generation whose tokens were journaled, the first reaching
    `first_position`."""
    log = GenerationLog(sampling)
    text = TokenText(sampling, tokenizer, log)
    for i, token in enumerate(tokens):
        text.add(token, first_position + i)
    return log


class Generation:
    def __init__(
        self,
        lease: Lease,
        sampling: SamplingParams,
        tokenizer: ByteTokenizer,
        log: GenerationLog | None = None,
        loop: asyncio.AbstractEventLoop | None = None,  # the running one (looked up if None)
        on_first_step: Callable[[], None] | None = None,
    ) -> None:
        """`on_first_step`: called once its first token applies (a generation without a prompt
        becomes the session's last request then: one whose first step failed changed nothing)."""
        loop = loop or asyncio.get_running_loop()
        self.lease = lease
        self.sampling = sampling
        self.log = log if log is not None else GenerationLog(sampling)
        self.tokens: Channel[GeneratedToken | BaseException] = Channel(loop)
        self.retired: asyncio.Future[None] = loop.create_future()
        self.cancelled = False
        self.started_at = time.perf_counter()
        self.last_token_at: float | None = None
        self.head: Head | None = None  # the head output after its last token (see Row.head)
        self._text = TokenText(sampling, tokenizer, self.log)
        self._on_first_step = on_first_step

    @property
    def finished(self) -> bool:
        return self.log.finished

    def row(self) -> Row:
        """This generation's row of the next step: sample from the last output, consume it."""
        session = self.lease.session
        assert session.slot is not None, "a generating session stays in memory"
        return Row(
            slot=session.slot, inputs=None, sampling=self.sampling, rng=session.rng, head=self.head
        )

    def leave(self) -> None:
        """Its consumer is gone (the generation ended, failed or its caller went away): the
        scheduler retires it before the next step, and a step waiting for the consumer to take
        a token (`BatchWindow`) need not."""
        self.cancelled = True
        self.tokens.abandon()

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
        generated = self._text.add(token, self.lease.advance(consumed, segment))
        if self._on_first_step is not None:
            self._on_first_step()
            self._on_first_step = None
        return generated

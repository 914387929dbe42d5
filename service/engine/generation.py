"""A running generation: the sampling settings, stop conditions and the token stream to its
consumer. The scheduler keeps it in the batch step after step until it finishes or is cancelled."""

from __future__ import annotations

import asyncio
import codecs
import time
from dataclasses import dataclass

from service.models import ByteTokenizer
from service.runtime.sampler import SamplingParams
from service.sessions.session import Session

FINISH_STOP_TOKEN = "stop_token"
FINISH_STOP_STRING = "stop_string"
FINISH_MAX_TOKENS = "max_tokens"


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # the text this token completes (UTF-8 pieces may span tokens, so can be "")
    position: int  # the session's position after consuming it
    finish_reason: str | None  # set on the last token


class Generation:
    def __init__(
        self, session: Session, sampling: SamplingParams, tokenizer: ByteTokenizer
    ) -> None:
        self.session = session
        self.sampling = sampling
        self.tokens: asyncio.Queue[GeneratedToken | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.count = 0
        self.started_at = time.perf_counter()
        self.last_token_at: float | None = None
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = ""  # recent text, long enough to spot any stop string
        self._tail_len = max((len(s) for s in sampling.stop_strings), default=0)

    def advance(self, token: int) -> GeneratedToken:
        """Record one sampled-and-consumed token; decide whether generation ends with it."""
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
        return GeneratedToken(token, text, self.session.position, reason)

"""How each kind of request is charged to its caller's input tokens per second, and given back.

The rate itself (a token bucket per principal, local or in the shared tier) is
`security.quotas`; this module says what each engine request costs and when what it did not use
is given back, so that a request refused changes nothing, its charge included:

- a feed (Step): its input, given back if the feed is refused;
- a Stream message's feeds: their inputs, charged together when they come to at most a
  second's worth (the bucket's size), else feed by feed in the message's order, as that many
  Steps would be, the feeds after one the bucket refused refused too; each refused feed's
  charge given back;
- a generation: its prompt and the most it may generate, reserved up front; what it did not
  apply itself (its prompt's step never ran, fewer tokens than asked, a retry's prompt and
  the tokens it sends again) is given back however it ends.

A call not charged (no principal, or no rate) costs nothing here, not even its inputs' sizes
(text is encoded to measure it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from service.engine.feed import Feed, FeedOutcome
from service.engine.generation import GeneratedToken
from service.engine.model_input import ModelInput
from service.engine.session_generator import Applied
from service.errors import SeqServeError
from service.runtime.sampler import SamplingParams
from service.security.quotas import Quotas, Reservation
from service.sessions.session_store import SessionStore

T = TypeVar("T")
Outcomes = list[FeedOutcome | SeqServeError]  # one per feed: its result, or what refused it


class RequestCharges:
    def __init__(self, quotas: Quotas, sessions: SessionStore, max_tokens: int) -> None:
        self._quotas = quotas
        self._sessions = sessions  # a generation's default sampling
        self._max_tokens = max_tokens  # the most one generation may ask for

    async def feed(self, inp: ModelInput, run: Callable[[], Awaitable[T]]) -> T:
        """`run()`, the feed of `inp`, charged its size; given back if it is refused."""
        if not self._quotas.charging:  # sizes (text encoded) only when someone is charged
            return await run()
        async with self._quotas.charged(inp.size()):  # given back if refused
            return await run()

    async def feed_many(
        self, feeds: Sequence[Feed], run: Callable[[Sequence[Feed]], Awaitable[Outcomes]]
    ) -> Outcomes:
        """`run(admitted)`, the feeds of one Stream message the caller's rate admits (`_admit`),
        in the message's order; the others refused with the quota's error. Each feed refused
        by `run` is given its charge back."""
        if not self._quotas.charging:
            return await run(feeds)
        sizes = [f.input.size() for f in feeds]
        admitted, over = await self._admit(sizes)
        if not admitted:
            assert over is not None
            return [over] * len(feeds)
        charged = sizes[:admitted]
        try:
            outcomes = await run(feeds[:admitted])
        except SeqServeError:
            await self._quotas.refund(sum(charged))
            raise
        # The feeds refused are given their charge back.
        await self._quotas.refund(
            sum(n for n, o in zip(charged, outcomes, strict=True) if isinstance(o, SeqServeError))
        )
        return outcomes if over is None else [*outcomes, *[over] * (len(feeds) - admitted)]

    async def _admit(self, sizes: list[int]) -> tuple[int, SeqServeError | None]:
        """Charge the leading feeds the rate admits: how many, and the refusal of the rest.
        Up to a second's worth in all (the bucket's size) they are charged together, in one
        take (one round trip to a shared tier), all or none. More is charged feed by feed, as
        Steps are: the first may leave a full bucket in debt (as one Step over a second's
        worth does), the rest wait for it. Charged together, such a message was admitted whole
        into a debt of any size (1,024 feeds of 4,096 tokens), the burst the bucket bounds."""
        if len(sizes) == 1 or sum(sizes) <= self._quotas.tokens_per_second:
            try:
                await self._quotas.charge(sum(sizes))
            except SeqServeError as exc:
                return 0, exc
            return len(sizes), None
        charged = 0
        try:
            for k, size in enumerate(sizes):
                try:
                    await self._quotas.charge(size)
                except SeqServeError as exc:
                    return k, exc
                charged += size
        except asyncio.CancelledError:  # nothing ran: what was taken goes back
            await asyncio.shield(self._quotas.refund(charged))
            raise
        return len(sizes), None

    async def reserve(
        self, session_id: str, prompt: ModelInput | None, sampling: SamplingParams | None
    ) -> Reservation | None:
        """Charge a generation its prompt and the most it may generate, up front; the unused
        part is given back when it ends (`settled`). A max_tokens over the cap is charged the
        cap (and then refused), so the caller's other calls never see a bucket in debt for
        tokens no generation may make. None when the call is not charged."""
        if not self._quotas.charging:
            return None
        params = sampling or self._sessions.get(session_id).default_sampling
        prompt_size = prompt.size() if prompt is not None else 0
        return await self._quotas.reserve(prompt_size + min(params.max_tokens, self._max_tokens))

    async def settled(
        self,
        tokens: AsyncIterator[GeneratedToken],
        prompt: ModelInput | None,
        reservation: Reservation,
        applied: Applied,
    ) -> AsyncIterator[GeneratedToken]:
        """`tokens`, then, however the generation ends (finished, stopped early, cancelled,
        refused, failed), the charge kept is what the call applied itself, as the generator
        told `applied`: its prompt, once its step ran, and the tokens it generated (read or
        not by the caller; not a retry's tokens sent again). The rest is given back."""
        try:
            async with contextlib.aclosing(tokens) as stream:  # type: ignore[type-var]
                async for token in stream:
                    yield token
        finally:
            kept_prompt = prompt.size() if prompt is not None and applied.prompt else 0
            await reservation.settle(kept_prompt + applied.tokens)

"""Generation out of a session: sample, feed the token back in, one step per token, in the
running batch of its version's step scheduler (see `engine.generation`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.engine.feed import check_request_id
from service.engine.generation import GeneratedToken, Generation, GenerationLog
from service.engine.model_input import ModelInput
from service.engine.session_feeder import SessionFeeder, not_a_retry
from service.engine.session_lease import SessionLeases
from service.engine.session_line import Line
from service.errors import Internal, InvalidArgument, SeqServeError
from service.runtime.sampler import SamplingParams
from service.sessions.session import Session


@dataclass
class Applied:
    """What one call of `generate` applied itself, told as it happens, for what the call is
    charged (`RequestCharges.settled`): a retry's prompt and the tokens it sends again from
    the first call's log are not among them."""

    prompt: bool = False  # its prompt's step applied (possibly after the call was cancelled)
    session: Session | None = None  # where its own tokens' steps run, once they may
    tokens_from: int = 0  # the session's position before its own first token

    @property
    def tokens(self) -> int:
        """Its own tokens the session has consumed so far."""
        return 0 if self.session is None else max(0, self.session.position - self.tokens_from)


class SessionGenerator:
    def __init__(self, leases: SessionLeases, feeder: SessionFeeder, max_tokens: int) -> None:
        self._leases = leases
        self._feeder = feeder  # validates a prompt and feeds it
        self._max_generate = max_tokens

    @property
    def max_tokens(self) -> int:
        """The most tokens one generation may ask for."""
        return self._max_generate

    async def generate(
        self,
        session_id: str,
        prompt: ModelInput | None = None,
        sampling: SamplingParams | None = None,
        line: Line | None = None,
        expected_position: int | None = None,
        request_id: str = "",
        applied: Applied | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Sample up to `max_tokens`, one token per step; each token is consumed into the
        session. Stopping early (cancel) leaves the session at its last completed step. A
        retry of the session's last generation (same request id, the position before it)
        sends the tokens it applied again, then continues it. `applied` is told what this
        call applies itself."""
        applied = applied if applied is not None else Applied()
        async with self._leases.hold(session_id, line) as lease:
            served = lease.served
            if served.tokenizer is None:
                raise InvalidArgument(
                    f"model {served.name!r} takes feature frames; generation needs a token model"
                )
            check_request_id(request_id)
            retried = lease.precondition(expected_position, request_id)
            lease.request_id = request_id
            first_step: Callable[[], None] | None = None  # remembers a new one (see below)
            if retried is not None:
                log = retried.reply
                if not isinstance(log, GenerationLog):
                    raise not_a_retry(lease, expected_position)
                for token in list(log.tokens):
                    yield token
                if log.finished:
                    return
            else:
                params = sampling or lease.session.default_sampling
                params.validate(served.config.output_dim, self._max_generate)
                before = lease.session.position
                prompt_inputs = self._feeder.inputs(served, prompt) if prompt is not None else None
                lease.journal_generation(request_id, params.as_dict())
                log = GenerationLog(params)

                def remember() -> None:
                    lease.remember(request_id, before, log)

                def prompt_applied() -> None:
                    applied.prompt = True
                    remember()

                # Remembered once its first step applies (the prompt, or without one the first
                # token), as recovery does (`replay_plan`): one whose first step was not
                # applied leaves the last request as it was. A call cancelled while that step
                # runs is remembered when the step applies, so its retry goes on with it.
                if prompt_inputs is not None:
                    await self._feeder.run(lease, prompt_inputs, if_applied_late=prompt_applied)
                    prompt_applied()
                else:
                    first_step = remember
            scheduler = served.scheduler
            generation = Generation(
                lease, log.params, served.tokenizer, log, scheduler.loop, first_step
            )
            applied.session, applied.tokens_from = lease.session, lease.session.position
            scheduler.start_generation(generation)
            lease.in_flight = generation.retired  # the lease outlives the last step
            try:
                while True:
                    item = await generation.tokens.get()
                    if isinstance(item, SeqServeError):  # draining, not durable
                        raise item
                    if isinstance(item, BaseException):
                        raise Internal("generation step failed") from item
                    yield item
                    if item.finish_reason is not None:
                        break
            finally:
                generation.leave()

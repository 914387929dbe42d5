"""A refused request changes nothing, its quota charge included: what a request was charged
(input tokens per second) is given back when it is refused before it runs. Each refused request
below is far over a second's worth, so a charge kept would leave the bucket in debt for seconds
to days and refuse the next one-token step; each is followed by that step."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.feed import Feed
from service.engine.model_input import ModelInput
from service.errors import (
    InvalidArgument,
    ModelNotFound,
    QuotaExceeded,
    SeqServeError,
    SessionNotFound,
)
from service.runtime.sampler import SamplingParams
from service.security import principal
from service.security.principal import Principal

from .conftest import EngineFactory, toks

RATE = 500  # tokens a second: one token refills in 2 ms
BIG = 5000  # ten seconds' worth


def _big() -> ModelInput:
    return toks(*([1] * BIG))


async def test_refused_requests_are_given_their_charge_back(make_engine: EngineFactory) -> None:
    engine = await make_engine(
        security={"tokens_per_second": RATE}, engine={"max_chunk_tokens": BIG}
    )
    principal.current.set(Principal("alice", "client"))
    s, _ = await engine.create_session("tok")

    async def next_step_goes_through() -> None:
        await engine.feed(s.session_id, toks(1))
        await asyncio.sleep(0.01)  # the bucket full again for the next big request

    huge = SamplingParams(max_tokens=10**8)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        _ = [t async for t in engine.generate(s.session_id, sampling=huge)]
    await next_step_goes_through()

    with pytest.raises(SessionNotFound):
        await engine.feed("no-such-session", _big())
    await next_step_goes_through()

    with pytest.raises(ModelNotFound):
        await engine.create_session("no-such-model", prefix=_big())
    await next_step_goes_through()

    with pytest.raises(InvalidArgument):
        await engine.feed(s.session_id, toks(*([1] * (BIG + 1))))  # over the chunk limit
    await next_step_goes_through()

    with pytest.raises(SeqServeError):  # a token id out of the vocabulary
        _ = [t async for t in engine.generate(s.session_id, prompt=toks(*([10**6] * BIG)))]
    await next_step_goes_through()

    (refused,) = await engine.feed_many([Feed("no-such-session", _big())])  # a Stream item
    assert isinstance(refused, SessionNotFound)
    await next_step_goes_through()  # (a message's fed and refused items: test_quota_stream.py)

    assert (await engine.describe_session(s.session_id)).position == 6  # refusals moved nothing
    await asyncio.sleep(1.0)  # a full bucket
    await engine.feed(s.session_id, _big())  # applied: charged, and kept
    # Nine seconds owed: refused, and told to wait more than 3 s, unless 6 s passed since that
    # charge, the feed's own step included (about 0.6 s on an idle host; at 1000 tokens a
    # second this allowed one second).
    with pytest.raises(QuotaExceeded) as err:
        await engine.feed(s.session_id, toks(1))
    assert err.value.retry_after is not None and err.value.retry_after > 3

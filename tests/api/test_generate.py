"""Generate over a real channel: stop conditions, finish reasons, greedy decoding against the
Step prediction and the reference, top-k / top-p supports, and seeded reproducibility."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import ReferenceSession, assert_matches_reference, softmax, text, tokens, top_ids

MAX = types.FINISH_REASON_MAX_TOKENS
STOP_TOKEN = types.FINISH_REASON_STOP_TOKEN
STOP_STRING = types.FINISH_REASON_STOP_STRING
UNSPECIFIED = types.FINISH_REASON_UNSPECIFIED


async def _create(client: SeqServeClient, **fields: object) -> str:
    request = pb.CreateSessionRequest(model="tok", **fields)  # type: ignore[arg-type]
    return (await client.sessions.CreateSession(request)).session.session_id


async def _fork(client: SeqServeClient, session_id: str, **fields: object) -> str:
    request = pb.ForkSessionRequest(session_id=session_id, **fields)  # type: ignore[arg-type]
    return (await client.sessions.ForkSession(request)).session.session_id


async def _generate(
    client: SeqServeClient,
    session_id: str,
    sampling: types.Sampling | None = None,
    prompt: types.Input | None = None,
) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(session_id=session_id)
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    if prompt is not None:
        request.prompt.CopyFrom(prompt)
    return [r async for r in client.sessions.Generate(request)]


def _ids(replies: list[pb.GenerateResponse]) -> list[int]:
    return [r.token.id for r in replies]


async def _step(
    client: SeqServeClient, session_id: str, inp: types.Input, **options: object
) -> pb.StepResponse:
    return await client.sessions.Step(
        pb.StepRequest(
            session_id=session_id,
            input=inp,
            options=types.PredictionOptions(**options),  # type: ignore[arg-type]
        )
    )


async def test_max_tokens_positions_and_finish_reason(client: SeqServeClient) -> None:
    sid = await _create(client, prefix=text("abc"), seed=1)
    replies = await _generate(client, sid, make_sampling(max_tokens=6))
    assert len(replies) == 6
    assert [r.position for r in replies] == [4, 5, 6, 7, 8, 9]
    assert {r.session_id for r in replies} == {sid}
    assert [r.token.finish_reason for r in replies] == [UNSPECIFIED] * 5 + [MAX]
    assert all(0 <= r.token.id < 256 for r in replies)
    info = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.session.position == 9


async def test_text_pieces_concatenate_to_the_decoded_bytes(client: SeqServeClient) -> None:
    sid = await _create(client, seed=8)
    replies = await _generate(client, sid, make_sampling(max_tokens=40, temperature=1.0))
    decoded = bytes(_ids(replies)).decode("utf-8", errors="replace")
    assert "".join(r.token.text for r in replies) == decoded


async def test_greedy_is_the_argmax_of_step_and_of_the_reference(
    client: SeqServeClient, store_root: Path
) -> None:
    prompt = list(b"Once upon")
    generator = await _create(client)
    replies = await _generate(
        client, generator, make_sampling(temperature=0, max_tokens=10), tokens(*prompt)
    )
    greedy = _ids(replies)
    assert replies[-1].position == len(prompt) + 10

    # Another session stepping one token at a time: each argmax is the next greedy token.
    stepper = await _create(client)
    reference = ReferenceSession(store_root, "tok")
    r = await _step(client, stepper, tokens(*prompt), top_k=3)
    out = reference.feed(prompt)[-1]
    for token in greedy:
        assert top_ids(r.prediction)[0] == token == int(np.argmax(out))
        assert_matches_reference(r.prediction, out)
        r = await _step(client, stepper, tokens(token), top_k=3)
        out = reference.feed([token])[-1]

    # Generated tokens were consumed: the generator's state equals the stepper's.
    a = await _step(client, generator, text("!"), top_k=5)
    b = await _step(client, stepper, text("!"), top_k=5)
    assert a.position == b.position == len(prompt) + 11
    assert top_ids(a.prediction) == top_ids(b.prediction)
    assert_matches_reference(a.prediction, reference.feed(list(b"!"))[-1])


async def test_prompt_in_generate_equals_step_then_generate(client: SeqServeClient) -> None:
    a = await _create(client, seed=4)
    b = await _create(client, seed=4)
    with_prompt = await _generate(client, a, make_sampling(max_tokens=8), text("Hello"))
    await _step(client, b, text("Hello"))
    after_step = await _generate(client, b, make_sampling(max_tokens=8))
    assert _ids(with_prompt) == _ids(after_step)
    assert (
        [r.position for r in with_prompt] == [r.position for r in after_step] == list(range(6, 14))
    )


async def test_stop_token_ids_end_on_the_stop_token(client: SeqServeClient) -> None:
    parent = await _create(client, prefix=text("x = "))
    probe = _ids(
        await _generate(
            client, await _fork(client, parent), make_sampling(temperature=0, max_tokens=12)
        )
    )
    stop_id = probe[4]
    end = probe.index(stop_id)  # the first time greedy decoding produces it
    replies = await _generate(
        client,
        await _fork(client, parent),
        make_sampling(
            temperature=0, max_tokens=12, stop_token_ids=[stop_id, 255 if stop_id != 255 else 254]
        ),
    )
    assert _ids(replies) == probe[: end + 1]
    assert replies[-1].token.id == stop_id  # included
    assert [r.token.finish_reason for r in replies] == [UNSPECIFIED] * end + [STOP_TOKEN]


async def test_stop_strings_end_once_the_text_contains_one(client: SeqServeClient) -> None:
    parent = await _create(client, prefix=text("def f("))
    probe = await _generate(
        client, await _fork(client, parent), make_sampling(temperature=0, max_tokens=16)
    )
    pieces = [r.token.text for r in probe]
    start = len("".join(pieces[:5]))
    stop = "".join(pieces)[start : start + 2]
    assert len(stop) == 2
    end = next(j for j in range(len(pieces)) if stop in "".join(pieces[: j + 1]))
    replies = await _generate(
        client,
        await _fork(client, parent),
        make_sampling(temperature=0, max_tokens=16, stop=["never-generated-\x00", stop]),
    )
    assert _ids(replies) == _ids(probe)[: end + 1]
    assert [r.token.finish_reason for r in replies] == [UNSPECIFIED] * end + [STOP_STRING]
    assert stop in "".join(r.token.text for r in replies)  # the stop string is in the output


async def test_session_default_sampling_applies_where_the_request_is_silent(
    client: SeqServeClient,
) -> None:
    default = make_sampling(temperature=0, max_tokens=3)
    sid = await _create(client, prefix=text("abc"), default_sampling=default)
    fork = await _fork(client, sid)
    replies = await _generate(client, sid)  # no sampling at all: the session's
    assert len(replies) == 3 and replies[-1].token.finish_reason == MAX
    explicit = await _generate(client, fork, make_sampling(temperature=0, max_tokens=5))
    assert _ids(replies) == _ids(explicit)[:3]
    # A request that sets only max_tokens keeps the default (greedy) temperature.
    more = await _generate(client, sid, make_sampling(max_tokens=2))
    assert _ids(more) == _ids(explicit)[3:5]


async def _supported_tokens_check(
    client: SeqServeClient, sampling: types.Sampling, seed: int, full: bool
) -> tuple[list[int], list[types.Prediction]]:
    """Generate 40 tokens after a prompt, then replay prompt + tokens in another session with
    per-position predictions: prediction i is the distribution token i was drawn from."""
    prompt = list(b"The ")
    sid = await _create(client, seed=seed, prefix=tokens(*prompt))
    generated = _ids(await _generate(client, sid, sampling))
    replay = await _create(client)
    r = await _step(
        client,
        replay,
        tokens(*prompt, *generated[:-1]),
        per_position=True,
        top_k=256 if full else 3,
    )
    return generated, list(r.per_position)[len(prompt) - 1 :]


async def test_top_k_restricts_the_support(client: SeqServeClient) -> None:
    generated, preds = await _supported_tokens_check(
        client, make_sampling(temperature=2.0, top_k=3, max_tokens=40), seed=21, full=False
    )
    assert all(tok in top_ids(pred) for tok, pred in zip(generated, preds, strict=True))
    # Without the cut the same draw leaves the top 3 (the random model is nearly uniform).
    free, preds = await _supported_tokens_check(
        client, make_sampling(temperature=2.0, max_tokens=40), seed=21, full=False
    )
    assert sum(tok not in top_ids(pred) for tok, pred in zip(free, preds, strict=True)) > 10


def _nucleus(pred: types.Prediction, top_p: float) -> set[int]:
    """Ids whose strictly-more-likely mass is below top_p (with slack for float noise)."""
    ranked = sorted(pred.tokens.top, key=lambda t: -t.prob)
    keep, mass = set(), 0.0
    for t in ranked:
        if mass < top_p + 1e-5 or not keep:
            keep.add(t.id)
        mass += t.prob
    return keep


async def test_top_p_restricts_the_support(client: SeqServeClient) -> None:
    generated, preds = await _supported_tokens_check(
        client, make_sampling(temperature=1.0, top_p=0.05, max_tokens=40), seed=5, full=True
    )
    sizes = [len(_nucleus(p, 0.05)) for p in preds]
    assert all(2 <= n <= 40 for n in sizes)  # a real cut of a 256-token distribution
    assert all(tok in _nucleus(pred, 0.05) for tok, pred in zip(generated, preds, strict=True))
    free, preds = await _supported_tokens_check(
        client, make_sampling(temperature=1.0, max_tokens=40), seed=5, full=True
    )
    assert sum(tok not in _nucleus(pred, 0.05) for tok, pred in zip(free, preds, strict=True)) > 10


async def test_top_p_one_and_top_k_zero_leave_the_distribution_alone(
    client: SeqServeClient,
) -> None:
    a = await _create(client, seed=77, prefix=text("q"))
    b = await _create(client, seed=77, prefix=text("q"))
    plain = await _generate(client, a, make_sampling(temperature=1.0, max_tokens=20))
    explicit = await _generate(
        client, b, make_sampling(temperature=1.0, max_tokens=20, top_p=1.0, top_k=0)
    )
    assert _ids(plain) == _ids(explicit)


async def test_seeded_generation_is_reproducible(client: SeqServeClient) -> None:
    sampling = make_sampling(temperature=1.0, max_tokens=24)

    async def run(seed: int) -> list[int]:
        sid = await _create(client, seed=seed, prefix=text("seed"))
        return _ids(await _generate(client, sid, sampling))

    first, again, other = await run(1234), await run(1234), await run(1235)
    assert first == again
    assert first != other

    # A fork without a seed continues the parent's random stream; with one it starts anew.
    parent = await _create(client, seed=9, prefix=text("seed"))
    same = await _fork(client, parent)
    reseeded = await _fork(client, parent, seed=10)
    base = _ids(await _generate(client, parent, sampling))
    assert _ids(await _generate(client, same, sampling)) == base
    assert _ids(await _generate(client, reseeded, sampling)) != base


def _inverse_cdf_draws(logits: np.ndarray, u: float, tol: float = 1e-5) -> set[int]:
    """The token a draw at uniform u takes from softmax(logits), tokens ranked best first, each
    covering [mass before it, mass through it): one token, or two when u lies within float32
    noise of the boundary between them."""
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    hi = np.cumsum(probs[order])
    lo = hi - probs[order]
    return {int(t) for t, a, b in zip(order, lo, hi, strict=True) if a - tol <= u < b + tol}


async def test_sampled_tokens_follow_the_reference_distribution(
    client: SeqServeClient, store_root: Path
) -> None:
    """Sampling at temperature 1 from the served model: each draw is the token the reference
    distribution gives at the session's next uniform number (its RNG is numpy's PCG64 seeded with
    the session's seed, one number per token), and the session ends up where the reference fed
    the same tokens does."""
    sid = await _create(client, seed=2, prefix=text("ab"))
    replies = await _generate(client, sid, make_sampling(temperature=1.0, max_tokens=16))
    reference = ReferenceSession(store_root, "tok")
    stream = np.random.Generator(np.random.PCG64(2))  # the session's stream, replayed
    out = reference.feed(list(b"ab"))[-1]
    for r in replies:
        u = float(stream.random())
        assert r.token.id in _inverse_cdf_draws(out, u), (r.position, u)
        out = reference.feed([r.token.id])[-1]
    after = await _step(client, sid, tokens(1), top_k=5)
    assert_matches_reference(after.prediction, reference.feed([1])[-1])


async def test_cancelled_generation_leaves_a_usable_session(client: SeqServeClient) -> None:
    sid = await _create(client, seed=3)
    call = client.sessions.Generate(
        pb.GenerateRequest(session_id=sid, sampling=make_sampling(max_tokens=2000))
    )
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            break
    call.cancel()
    # The server retires the generation at its next step; until then the session is busy.
    for _ in range(6_000):  # a loaded host may take seconds
        try:
            r = await _step(client, sid, text("z"))
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.ABORTED, err
            await asyncio.sleep(0.01)
    else:
        raise AssertionError("session still busy long after its generation was cancelled")
    assert 3 + 1 <= r.position < 2000


async def test_python_client_session_api(client: SeqServeClient) -> None:
    """The client wrapper's paths: create, feed, generate with stops, fork, refresh, close."""
    session = await client.create_session("tok", seed=6, ttl_seconds=90)
    assert session.info.seed == 6 and session.info.ttl_seconds == 90
    pred = await session.feed(text="ab", top_k=2)
    assert pred.position == 2 and len(pred.top) == 2 and not pred.values
    branch = await session.fork()
    greedy = [p async for p in session.generate(max_tokens=6, temperature=0)]
    assert [p.position for p in greedy] == [3, 4, 5, 6, 7, 8]
    assert greedy[-1].finish_reason == "max_tokens"
    stop_id = greedy[2].token_id
    stopped = [
        p async for p in branch.generate(max_tokens=6, temperature=0, stop_token_ids=[stop_id])
    ]
    end = [p.token_id for p in greedy].index(stop_id)
    assert [p.token_id for p in stopped] == [p.token_id for p in greedy][: end + 1]
    assert stopped[-1].finish_reason == "stop_token"
    assert (await session.refresh()).position == 8
    assert (await (await client.attach(branch.session_id)).refresh()).position == 2 + end + 1
    await branch.close()
    await session.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await session.refresh()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # closed

    series = await client.create_session("frames")
    values = await series.feed(frames=[0.5, -0.5, 1.0])
    assert values.position == 1 and len(values.values) == 2 and not values.top

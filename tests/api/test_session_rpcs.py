"""SessionService's unary RPCs over a real channel: CreateSession, GetSession, CloseSession,
ForkSession and Step, with every served prediction checked against the NumPy transcription of
the article's equations run on the same weights file."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration

from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import (
    ReferenceSession,
    assert_matches_reference,
    expect_status,
    frames,
    text,
    tokens,
    top_ids,
    top_probs,
)


async def _create(client: SeqServeClient, model: str = "tok", **fields: object) -> types.Session:
    response = await client.sessions.CreateSession(pb.CreateSessionRequest(model=model, **fields))  # type: ignore[arg-type]
    return response.session


async def _step(
    client: SeqServeClient, session_id: str, inp: types.Input, **options: object
) -> pb.StepResponse:
    return await client.sessions.Step(
        pb.StepRequest(
            session_id=session_id,
            request_id="r",
            input=inp,
            options=types.PredictionOptions(**options),  # type: ignore[arg-type]
        )
    )


# ---- CreateSession ---------------------------------------------------------------------------


async def test_create_session_echoes_seed_ttl_sampling_and_feeds_the_prefix(
    client: SeqServeClient, store_root: Path
) -> None:
    sampling = make_sampling(temperature=0.5, top_k=7, top_p=0.9, max_tokens=9, stop=["\n"])
    response = await client.sessions.CreateSession(
        pb.CreateSessionRequest(
            model="tok",
            seed=42,
            ttl=Duration(seconds=30),
            default_sampling=sampling,
            prefix=text("hi"),
            options=types.PredictionOptions(top_k=3),
        )
    )
    s = response.session
    assert s.session_id.startswith("s_") and s.model == "tok" and s.version == 1
    assert s.position == 2 and s.seed == 42 and s.parent_session_id == ""
    assert s.state == types.SESSION_STATE_ACTIVE
    assert s.ttl.ToSeconds() == 30
    assert s.expires_at.ToNanoseconds() > s.created_at.ToNanoseconds()
    assert len(s.fingerprint) >= 16
    d = s.default_sampling
    assert (round(d.temperature, 6), d.top_k, round(d.top_p, 6), d.max_tokens) == (0.5, 7, 0.9, 9)
    assert list(d.stop_strings) == ["\n"]

    assert response.prediction.position == 2 and len(response.prediction.tokens.top) == 3
    reference = ReferenceSession(store_root, "tok")
    assert_matches_reference(response.prediction, reference.feed(list(b"hi"))[-1])

    # Unset seed: the server picks one and reports it; unset ttl: the server default (600 s).
    plain = await _create(client)
    assert plain.position == 0 and plain.seed != 42 and plain.ttl.ToSeconds() == 600


async def test_create_session_prefix_options(client: SeqServeClient, store_root: Path) -> None:
    skipped = await client.sessions.CreateSession(
        pb.CreateSessionRequest(
            model="tok", prefix=tokens(1, 2, 3), options=types.PredictionOptions(skip=True)
        )
    )
    assert skipped.session.position == 3
    assert not skipped.HasField("prediction") and not skipped.per_position

    every = await client.sessions.CreateSession(
        pb.CreateSessionRequest(
            model="tok", prefix=text("abcd"), options=types.PredictionOptions(per_position=True)
        )
    )
    assert [p.position for p in every.per_position] == [1, 2, 3, 4]
    outputs = ReferenceSession(store_root, "tok").feed(list(b"abcd"))
    for pred, out in zip(every.per_position, outputs, strict=True):
        assert_matches_reference(pred, out)
    assert every.per_position[-1] == every.prediction


# ---- GetSession / CloseSession ---------------------------------------------------------------


async def test_get_session_tracks_position(client: SeqServeClient) -> None:
    s = await _create(client, seed=5)
    await _step(client, s.session_id, text("hello"))
    await _step(client, s.session_id, tokens(7))
    got = (await client.sessions.GetSession(pb.GetSessionRequest(session_id=s.session_id))).session
    assert got.session_id == s.session_id and got.position == 6 and got.seed == 5
    assert got.created_at == s.created_at and got.state == types.SESSION_STATE_ACTIVE


async def test_close_session_then_every_rpc_says_it_was_closed(client: SeqServeClient) -> None:
    s = await _create(client, prefix=text("abc"))
    closed = (
        await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=s.session_id))
    ).session
    assert closed.state == types.SESSION_STATE_CLOSED and closed.position == 3
    sid = s.session_id
    fp = grpc.StatusCode.FAILED_PRECONDITION  # DESIGN's table: "session closed"
    await expect_status(
        client.sessions.GetSession(pb.GetSessionRequest(session_id=sid)), fp, "closed"
    )
    await expect_status(_step(client, sid, text("x")), fp, "closed")
    await expect_status(
        client.sessions.ForkSession(pb.ForkSessionRequest(session_id=sid)), fp, "closed"
    )
    await expect_status(
        client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid)), fp, "closed"
    )

    async def generate() -> None:
        async for _ in client.sessions.Generate(pb.GenerateRequest(session_id=sid)):
            pass

    await expect_status(generate(), fp, "closed")
    # Never seen at all is a different status and message.
    nf = grpc.StatusCode.NOT_FOUND
    unknown = await expect_status(
        client.sessions.GetSession(pb.GetSessionRequest(session_id="s_nope")), nf, "s_nope"
    )
    assert "closed" not in unknown


# ---- ForkSession -----------------------------------------------------------------------------


async def test_fork_copies_position_and_state_then_diverges(
    client: SeqServeClient, store_root: Path
) -> None:
    parent = await _create(client, seed=3, prefix=text("The cat"))
    child = (
        await client.sessions.ForkSession(pb.ForkSessionRequest(session_id=parent.session_id))
    ).session
    assert child.session_id != parent.session_id
    assert child.parent_session_id == parent.session_id
    assert child.position == parent.position == 7
    assert child.seed == 3 and child.model == "tok" and child.version == 1
    assert child.fingerprint == parent.fingerprint

    # Right after the fork both predict the same next token for the same input.
    a = await _step(client, parent.session_id, text(" s"), top_k=10)
    b = await _step(client, child.session_id, text(" s"), top_k=10)
    assert a.position == b.position == 9
    assert top_ids(a.prediction) == top_ids(b.prediction)
    np.testing.assert_allclose(top_probs(a.prediction), top_probs(b.prediction), atol=1e-6)

    # Then they diverge independently, each equal to the reference fed its own history.
    ref_parent = ReferenceSession(store_root, "tok")
    ref_parent.feed(list(b"The cat s"))
    ref_child = ReferenceSession(store_root, "tok")
    ref_child.feed(list(b"The cat s"))
    a = await _step(client, parent.session_id, text("at"), top_k=10)
    b = await _step(client, child.session_id, text("ings"), top_k=10)
    assert (a.position, b.position) == (11, 13)
    assert top_ids(a.prediction) != top_ids(b.prediction)
    assert_matches_reference(a.prediction, ref_parent.feed(list(b"at"))[-1])
    assert_matches_reference(b.prediction, ref_child.feed(list(b"ings"))[-1])

    # Closing the parent leaves the fork alone.
    await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=parent.session_id))
    c = await _step(client, child.session_id, tokens(33), top_k=10)
    assert c.position == 14
    assert_matches_reference(c.prediction, ref_child.feed([33])[-1])


async def test_fork_options(client: SeqServeClient) -> None:
    parent = await _create(client, seed=3, ttl=Duration(seconds=45))
    same = (
        await client.sessions.ForkSession(pb.ForkSessionRequest(session_id=parent.session_id))
    ).session
    assert same.ttl.ToSeconds() == 45 and same.seed == 3
    other = (
        await client.sessions.ForkSession(
            pb.ForkSessionRequest(session_id=parent.session_id, seed=99, ttl=Duration(seconds=20))
        )
    ).session
    assert other.ttl.ToSeconds() == 20 and other.seed == 99 and other.position == 0
    # A fork of a fork records its own parent.
    grandchild = (
        await client.sessions.ForkSession(pb.ForkSessionRequest(session_id=other.session_id))
    ).session
    assert grandchild.parent_session_id == other.session_id


# ---- Step --------------------------------------------------------------------------------------


async def test_step_echoes_ids_and_honours_top_k_per_position_and_skip(
    client: SeqServeClient,
) -> None:
    s = await _create(client)
    r = await client.sessions.Step(
        pb.StepRequest(session_id=s.session_id, request_id="req-1", input=text("ab"))
    )
    assert (r.session_id, r.request_id, r.position) == (s.session_id, "req-1", 2)
    assert r.prediction.position == 2
    assert len(r.prediction.tokens.top) == 5  # the server default
    assert not r.per_position
    for k in (1, 12, 256):
        r = await _step(client, s.session_id, tokens(65), top_k=k)
        assert len(r.prediction.tokens.top) == k
    probs = top_probs(r.prediction)
    assert abs(sum(probs) - 1.0) < 1e-4  # all 256: a distribution
    assert probs == sorted(probs, reverse=True)
    assert {t.id for t in r.prediction.tokens.top} == set(range(256))
    by_id = {t.id: t.text for t in r.prediction.tokens.top}
    assert by_id[65] == "A" and by_id[10] == "\n" and by_id[200] == "\ufffd"

    r = await _step(client, s.session_id, text("xyz"), per_position=True, top_k=2)
    assert r.position == 8
    assert [p.position for p in r.per_position] == [6, 7, 8]
    assert all(len(p.tokens.top) == 2 for p in r.per_position)
    assert r.per_position[-1] == r.prediction

    r = await _step(client, s.session_id, text("q"), skip=True)
    assert r.position == 9 and not r.HasField("prediction") and not r.per_position


async def test_text_is_utf8_bytes(client: SeqServeClient) -> None:
    a = await _create(client)
    b = await _create(client)
    ra = await _step(client, a.session_id, text("héllo ✓"), top_k=8)
    rb = await _step(client, b.session_id, tokens(*"héllo ✓".encode()), top_k=8)
    assert ra.position == rb.position == len("héllo ✓".encode())
    assert top_ids(ra.prediction) == top_ids(rb.prediction)
    np.testing.assert_allclose(top_probs(ra.prediction), top_probs(rb.prediction), atol=1e-6)


# ---- parity with the article's equations --------------------------------------------------------


async def test_token_lstm_matches_reference_over_chunks(
    client: SeqServeClient, store_root: Path
) -> None:
    rng = np.random.default_rng(0)
    s = await _create(client)
    reference = ReferenceSession(store_root, "tok")
    for size in (1, 5, 1, 1, 17, 3, 64, 2):
        chunk = [int(t) for t in rng.integers(0, 256, size)]
        r = await _step(client, s.session_id, tokens(*chunk), top_k=8, per_position=True)
        outputs = reference.feed(chunk)
        assert r.position == reference.position
        assert len(r.per_position) == size
        for pred, out in zip(r.per_position, outputs, strict=True):
            assert_matches_reference(pred, out)
        assert_matches_reference(r.prediction, outputs[-1])


async def test_article_gru_frames_match_reference_over_chunks(
    client: SeqServeClient, store_root: Path
) -> None:
    rng = np.random.default_rng(1)
    reference = ReferenceSession(store_root, "frames")
    assert reference.config.cell == "gru" and reference.config.reset_after is False
    dim = reference.frame_dim
    first = [float(v) for v in rng.normal(size=2 * dim)]
    response = await client.sessions.CreateSession(
        pb.CreateSessionRequest(model="frames", prefix=frames(first))
    )
    s = response.session
    assert s.position == 2
    assert_matches_reference(response.prediction, reference.feed(first)[-1])
    for n in (1, 4, 1, 9, 2, 30):
        chunk = [float(v) for v in rng.normal(size=n * dim)]
        r = await _step(client, s.session_id, frames(chunk), per_position=True)
        outputs = reference.feed(chunk)
        assert r.position == reference.position
        assert r.prediction.WhichOneof("kind") == "regression"
        assert len(r.prediction.regression.values) == 2
        assert [p.position for p in r.per_position] == list(
            range(reference.position - n + 1, reference.position + 1)
        )
        for pred, out in zip(r.per_position, outputs, strict=True):
            assert_matches_reference(pred, out)
        assert_matches_reference(r.prediction, outputs[-1])

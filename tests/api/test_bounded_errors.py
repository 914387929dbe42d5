"""A client's lists and strings in an error are bounded (a few ids, ~100 characters), so a
refusal is a short INVALID_ARGUMENT / NOT_FOUND and never a status or in-band reply too big to
send; and ttl Durations that protobuf's Duration does not allow are refused, not normalised. Over
a real channel."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .conftest import ServerFactory
from .support import code_value, expect_status, expect_stream_status, item, read_replies, text

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SHORT = 300  # characters: what a refusal naming a few ids and its limits takes, with room

INT32_MIN = -(2**31)


async def _create(client: SeqServeClient, **fields: object) -> str:
    request = pb.CreateSessionRequest(model="tok", **fields)  # type: ignore[arg-type]
    return (await client.sessions.CreateSession(request)).session.session_id


def _generate(client: SeqServeClient, sid: str, sampling: types.Sampling):  # type: ignore[no-untyped-def]
    return client.sessions.Generate(pb.GenerateRequest(session_id=sid, sampling=sampling))


# ---- stop_token_ids ----------------------------------------------------------------------------


async def test_the_most_stop_token_ids_all_out_of_range_are_refused_in_a_short_message(
    client: SeqServeClient,
) -> None:
    """1,024 ids (the documented limit) of -2^31: INVALID_ARGUMENT naming a few of them and how
    many more. (Every id was echoed: a 13 KB status, over gRPC's metadata limit, so the client
    got RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" without an ErrorInfo.)"""
    sid = await _create(client, seed=1)
    sampling = types.Sampling(stop_token_ids=[INT32_MIN] * 1024, max_tokens=1)
    details = await expect_stream_status(
        _generate(client, sid, sampling),
        INVALID, "stop token ids out of range [0, 256)", str(INT32_MIN), "and 1016 more",
        reason="INVALID_ARGUMENT",
    )  # fmt: skip
    assert len(details) < SHORT, details
    # As a session's default sampling, refused at create as short.
    details = await expect_status(
        client.sessions.CreateSession(
            pb.CreateSessionRequest(
                model="tok", default_sampling=types.Sampling(stop_token_ids=[999] * 1024)
            )
        ),
        INVALID, "999", "and 1016 more",
    )  # fmt: skip
    assert len(details) < SHORT, details
    # A few bad ids are all named; the good ones among them are not.
    few = types.Sampling(stop_token_ids=[3, 256, 7, -1], max_tokens=1)
    details = await expect_stream_status(_generate(client, sid, few), INVALID, "[256, -1]")
    assert "more" not in details
    # Over the limit, the count is what is refused, whatever the ids.
    over = types.Sampling(stop_token_ids=[INT32_MIN] * 1025, max_tokens=1)
    details = await expect_stream_status(
        _generate(client, sid, over), INVALID, "at most 1024 stop token ids, got 1025"
    )
    assert len(details) < SHORT, details
    # Nothing was applied.
    info = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.session.position == 0


async def test_a_stream_item_with_very_many_bad_stop_ids_gets_its_error_in_band(
    server_factory: ServerFactory,
) -> None:
    """One generate item with 6,000 stop ids of -2^31 (a 60 KB message, under the 64 KiB
    limit): its error travels in-band and the stream goes on, another session's feeds in the
    same message and the next answered and applied. (The error echoed every id: a 78 KB reply,
    over the limit, which tore the whole stream down: DESIGN section 4.)"""
    srv = await server_factory(server={"max_message_bytes": 64 * 1024})
    async with SeqServeClient(f"127.0.0.1:{srv.port}") as client:
        a, b = await _create(client, seed=1), await _create(client, seed=2)
        bad = item(a, "bad", generate=types.Sampling(stop_token_ids=[INT32_MIN] * 6000))
        first = pb.StreamRequest(items=[bad, item(b, "b1", text("hi"))])
        assert first.ByteSize() < 64 * 1024
        call = client.sessions.Stream()
        await call.write(first)
        await call.write(pb.StreamRequest(items=[item(b, "b2", text("!"))]))
        replies = await read_replies(call, ["b1", "b2"], generate=["bad"])
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        (refused,) = replies["bad"]
        assert refused.error.code == code_value(INVALID), refused.error
        assert "at most 1024 stop token ids, got 6000" in refused.error.message
        assert len(refused.error.message) < SHORT
        assert [r.position for r in replies["b1"] + replies["b2"]] == [2, 3]
        assert all(r.error.code == 0 for r in replies["b1"] + replies["b2"])
        got_b = await client.sessions.GetSession(pb.GetSessionRequest(session_id=b))
        got_a = await client.sessions.GetSession(pb.GetSessionRequest(session_id=a))
        assert (got_b.session.position, got_a.session.position) == (3, 0)


# ---- version numbers ---------------------------------------------------------------------------


async def test_a_version_number_too_long_to_be_a_version_is_not_found_quoted(
    client: SeqServeClient,
) -> None:
    """4,301 nines was INTERNAL (Python's int() refuses over 4,300 digits); 4,300 was NOT_FOUND
    echoing all of them. Both, and longer, are NOT_FOUND with at most ~100 characters of it."""
    for digits in (20, 4300, 4301, 100_000):
        request = pb.CreateSessionRequest(model="tok", version="9" * digits)
        details = await expect_status(
            client.sessions.CreateSession(request),
            NOT_FOUND, "9999", "not found", "versions: 1",
            reason="VERSION_NOT_FOUND",
        )  # fmt: skip
        assert len(details) < SHORT, (digits, details)
    # Leading zeros do not count: this names version 1, as "01" does.
    made = await client.sessions.CreateSession(
        pb.CreateSessionRequest(model="tok", version="0" * 5000 + "1")
    )
    assert made.session.version == 1
    # An unknown model with such a version is still the model's NOT_FOUND.
    await expect_status(
        client.sessions.CreateSession(pb.CreateSessionRequest(model="nope", version="9" * 5000)),
        NOT_FOUND, "nope", reason="MODEL_NOT_FOUND",
    )  # fmt: skip


# ---- ttl Durations -----------------------------------------------------------------------------

BAD_DURATIONS = [
    (Duration(seconds=5, nanos=2_000_000_000), "nanos"),  # nanos out of range: was 7 s
    (Duration(seconds=1, nanos=-5), "sign"),  # mixed signs: was 1 s less 5 ns
    (Duration(seconds=1, nanos=-1_000_000_000), "nanos"),  # sums to 0: was the 600 s default
    (Duration(seconds=-1, nanos=2_000_000_000), "nanos"),  # sums to +1 s: was 1 s
    (Duration(seconds=0, nanos=-1_000_000_000), "nanos"),
    (Duration(seconds=-1, nanos=-5), "(0, 86400"),  # a valid Duration, but negative
    (Duration(), "(0, 86400"),  # set to 0: the range says 0 is not a ttl
]


async def test_invalid_ttl_durations_are_refused_for_create_and_fork(
    server: SeqServeServer, client: SeqServeClient
) -> None:
    parent = await _create(client)
    for duration, needle in BAD_DURATIONS:
        shown = f"seconds={duration.seconds}, nanos={duration.nanos}"
        details = await expect_status(
            client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", ttl=duration)),
            INVALID, "ttl", needle, reason="INVALID_ARGUMENT",
        )  # fmt: skip
        assert len(details) < SHORT, (shown, details)
        await expect_status(
            client.sessions.ForkSession(pb.ForkSessionRequest(session_id=parent, ttl=duration)),
            INVALID, "ttl", needle, reason="INVALID_ARGUMENT",
        )  # fmt: skip
    # Unset: the server's default (600 s), and for a fork the parent's.
    made = (await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))).session
    assert (made.ttl.seconds, made.ttl.nanos) == (600, 0)
    own = await _create(client, ttl=Duration(seconds=30))
    fork = await client.sessions.ForkSession(pb.ForkSessionRequest(session_id=own))
    assert (fork.session.ttl.seconds, fork.session.ttl.nanos) == (30, 0)
    # Valid Durations with nanos are taken as they are.
    half = (
        await client.sessions.CreateSession(
            pb.CreateSessionRequest(model="tok", ttl=Duration(seconds=1, nanos=500_000_000))
        )
    ).session
    assert (half.ttl.seconds, half.ttl.nanos) == (1, 500_000_000)
    tiny = await client.sessions.ForkSession(
        pb.ForkSessionRequest(session_id=parent, ttl=Duration(nanos=999_999_999))
    )
    assert (tiny.session.ttl.seconds, tiny.session.ttl.nanos) == (0, 999_999_999)
    # The refused ones made nothing: the six sessions above are all that live.
    assert len(server.engine.sessions) == 6

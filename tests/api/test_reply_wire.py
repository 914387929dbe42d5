"""reply_wire: feed replies written as wire bytes parse to the very message protobuf's API builds
(and, where protobuf would write every field, to the very bytes)."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from service.api import convert, reply_wire
from service.models.tokenizer import ByteTokenizer
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.runtime.step_batch import Prediction

TOKENIZER = ByteTokenizer()
POSITIONS = [0, 1, 127, 128, 16_383, 16_384, 2**40]
IDS = ["", "s_a.1", "séssion-ü", "x" * 200]  # a 200-byte id needs a two-byte length


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _by_api(
    session_id: str, request_id: str, position: int, pred: Prediction | None
) -> pb.StreamResponse:
    """The reply as `_feed_items` built it before, field by field."""
    response = pb.StreamResponse()
    reply = response.replies.add(session_id=session_id, request_id=request_id, position=position)
    if pred is not None:
        convert.fill_prediction(reply.prediction, pred, position, TOKENIZER)
    return response


def _by_wire(
    session_id: str, request_id: str, position: int, pred: Prediction | None
) -> pb.StreamResponse:
    response = pb.StreamResponse()
    response.MergeFromString(
        reply_wire.feed_reply(session_id, request_id, position, pred, TOKENIZER)
    )
    return response


def _token_prediction(rng: random.Random, k: int) -> Prediction:
    ids = rng.sample(range(256), k)
    probs = sorted((_f32(rng.random()) for _ in range(k)), reverse=True)
    return Prediction(top_ids=ids, top_probs=probs)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("session_id", IDS)
@pytest.mark.parametrize("request_id", ["", "req-7", "ré-ü", "r" * 300])
def test_a_token_prediction_reply_is_the_message_the_api_builds(
    position: int, session_id: str, request_id: str
) -> None:
    rng = random.Random(zlib.crc32(repr((position, session_id, request_id)).encode()))
    for k in (0, 1, 5, 40, 256):  # 40 and 256 entries: the top list's length takes two bytes
        pred = _token_prediction(rng, k)
        wire = _by_wire(session_id, request_id, position, pred)
        api = _by_api(session_id, request_id, position, pred)
        assert wire == api
        # No probability is 0 here, so every field is one protobuf writes: the same bytes.
        wire_bytes = reply_wire.feed_reply(session_id, request_id, position, pred, TOKENIZER)
        assert wire_bytes == api.SerializeToString()


def test_every_token_id_and_its_text() -> None:
    """Ids 0 (not written: the default), 127 / 128 (one and two varint bytes), bytes that are
    not UTF-8 on their own (U+FFFD, three bytes of text), and a probability of 0."""
    ids = list(range(256))
    probs = [_f32(1.0 - i / 256) for i in ids]
    probs[-1] = 0.0
    pred = Prediction(top_ids=ids, top_probs=probs)
    assert _by_wire("s", "r", 3, pred) == _by_api("s", "r", 3, pred)
    parsed = _by_wire("s", "r", 3, pred).replies[0].prediction.tokens.top
    assert [e.id for e in parsed] == ids
    assert [e.text for e in parsed] == [TOKENIZER.decode_one(i) for i in ids]
    assert parsed[200].text == "\ufffd" and parsed[65].text == "A"


def test_a_skipped_prediction_is_no_prediction() -> None:
    reply = _by_wire("s_a.1", "r", 12, None).replies[0]
    assert not reply.HasField("prediction")
    assert (reply.session_id, reply.request_id, reply.position) == ("s_a.1", "r", 12)
    assert _by_wire("s_a.1", "r", 12, None) == _by_api("s_a.1", "r", 12, None)


@pytest.mark.parametrize("n", [1, 3, 40])
def test_a_regression_prediction(n: int) -> None:
    rng = random.Random(n)
    pred = Prediction(values=[_f32(rng.uniform(-5, 5)) for _ in range(n)])
    wire = _by_wire("s", "", 4, pred)
    assert wire == _by_api("s", "", 4, pred)
    assert wire.replies[0].prediction.WhichOneof("kind") == "regression"
    assert list(wire.replies[0].prediction.regression.values) == pred.values


def test_many_replies_and_serialized_ones_in_one_response_keep_their_order() -> None:
    rng = random.Random(5)
    error = pb.StreamReply(session_id="s_b.2", request_id="bad")
    error.error.code, error.error.message = 3, "no"
    entries, expected = [], pb.StreamResponse()
    for i in range(64):
        if i % 10 == 3:
            entries.append(reply_wire.message_entry(error.SerializeToString()))
            expected.replies.add().CopyFrom(error)
            continue
        pred = _token_prediction(rng, 5)
        entries.append(reply_wire.feed_reply(f"s_a.{i}", f"r{i}", i, pred, TOKENIZER))
        convert.fill_prediction(
            expected.replies.add(session_id=f"s_a.{i}", request_id=f"r{i}", position=i).prediction,
            pred,
            i,
            TOKENIZER,
        )
    response = pb.StreamResponse()
    response.MergeFromString(b"".join(entries))
    assert response == expected


def test_a_negative_position_or_token_id_is_refused_not_wrapped() -> None:
    """Neither can come from a step; were one to, a table lookup would have wrapped it to
    another number silently (the protobuf API wrote it as a ten-byte varint)."""
    with pytest.raises(ValueError):
        reply_wire.feed_reply("s", "r", -1, None, TOKENIZER)
    with pytest.raises(ValueError):
        reply_wire.feed_reply(
            "s", "r", 3, Prediction(top_ids=[4, -1], top_probs=[0.5, 0.25]), TOKENIZER
        )


def test_varint() -> None:
    assert reply_wire.varint(0) == b"\x00"
    for n in [1, 127, 128, 300, 16_383, 16_384, 2**40, 2**63 - 1]:
        msg = types.Prediction(position=n)
        assert reply_wire.varint(n) == msg.SerializeToString()[1:]  # after the tag
    with pytest.raises(ValueError):
        reply_wire.varint(-1)


def test_the_field_numbers_it_writes_are_the_protos() -> None:
    """Renumbering any of these fields in `protos/` must fail here, not garble replies."""

    def number(message: type, field: str) -> int:
        return message.DESCRIPTOR.fields_by_name[field].number  # type: ignore[attr-defined]

    assert number(pb.StreamResponse, "replies") == 1
    assert [number(pb.StreamReply, f) for f in ("session_id", "request_id", "position")] == [
        1, 2, 3,
    ]  # fmt: skip
    assert number(pb.StreamReply, "prediction") == 4
    assert [number(types.Prediction, f) for f in ("tokens", "regression", "position")] == [1, 2, 3]
    assert number(types.TokenPrediction, "top") == 1
    assert [number(types.TopToken, f) for f in ("id", "prob", "text")] == [1, 2, 3]
    assert number(types.Regression, "values") == 1
    assert types.Regression.DESCRIPTOR.fields_by_name["values"].is_packed

"""Protobuf conversions on the hot path: one streamed token and the prediction
options are shared objects (both are immutable), with the same values a fresh one would have;
a generated token is written into its reply in place."""

from __future__ import annotations

import math

import pytest

from service.api import convert
from service.engine import feed as feed_module
from service.engine.feed import PredictionOptions
from service.engine.generation import FINISH_MAX_TOKENS, GeneratedToken
from service.engine.model_input import ModelInput, to_tensor
from service.errors import InvalidArgument
from service.models import ByteTokenizer, ModelConfig
from service.pb.seqserve.v1 import session_service_pb2 as spb
from service.pb.seqserve.v1 import types_pb2 as pb
from service.runtime.sampler import SamplingParams


def _tokens(*ids: int) -> pb.Input:
    return pb.Input(tokens=pb.Tokens(ids=list(ids)))


def test_one_token_is_one_shared_input_with_the_tokens_value() -> None:
    first, again = convert.input_from_pb(_tokens(65)), convert.input_from_pb(_tokens(65))
    assert first is again
    assert first == ModelInput(tokens=(65,)) and first.size() == 1
    assert convert.input_from_pb(_tokens(66)).tokens == (66,)


def test_tokens_outside_the_shared_range_and_longer_inputs_are_their_own() -> None:
    big = convert.input_from_pb(_tokens(10**9))
    assert big.tokens == (10**9,) and big is not convert.input_from_pb(_tokens(10**9))
    several = convert.input_from_pb(_tokens(1, 2, 3))
    assert list(several.tokens or ()) == [1, 2, 3]


def test_a_shared_token_out_of_the_vocabulary_is_still_refused() -> None:
    config = ModelConfig(
        cell="lstm", num_layers=1, hidden_size=8, input_kind="tokens", input_dim=256,
        embed_dim=4, head_kind="classification", output_dim=256,
    )  # fmt: skip
    inp = convert.input_from_pb(_tokens(config.input_dim))  # one past the last id
    with pytest.raises(InvalidArgument, match="out of range"):
        to_tensor(inp, "m", config, ByteTokenizer(), cap=64)
    assert convert.input_from_pb(_tokens(-1)).tokens == (-1,)  # negative: never shared


def test_prediction_options_are_shared_per_value_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed_module, "_SHARED_OPTIONS", {})  # filled here, restored after
    msg = pb.PredictionOptions(top_k=7, per_position=True)
    first = convert.options_from_pb(msg)
    assert first is convert.options_from_pb(msg)
    assert first == PredictionOptions(top_k=7, per_position=True)
    assert convert.options_from_pb(pb.PredictionOptions()) == PredictionOptions()
    for k in range(feed_module._SHARED_OPTIONS_MAX + 10):  # past the bound: built each time
        assert PredictionOptions.of(1000 + k, False).top_k == 1000 + k
    assert len(feed_module._SHARED_OPTIONS) <= feed_module._SHARED_OPTIONS_MAX


def test_a_generated_token_is_written_into_its_reply_in_place() -> None:
    reply = spb.GenerateResponse(session_id="s", position=3)
    convert.fill_token(reply.token, GeneratedToken(0, "", 3, None))  # every field at its zero
    assert reply.HasField("token")  # still set: a client reads the token field, not its absence
    assert reply == spb.GenerateResponse(session_id="s", position=3, token=pb.GeneratedToken())
    last = spb.StreamReply(session_id="s", position=4)
    convert.fill_token(last.token, GeneratedToken(66, "B", 4, FINISH_MAX_TOKENS))
    assert (last.token.id, last.token.text) == (66, "B")
    assert last.token.finish_reason == pb.FINISH_REASON_MAX_TOKENS


def _fresh_sampling(msg: pb.Sampling, base: SamplingParams) -> SamplingParams:
    """What `sampling_from_pb` returns, built without the shared table."""
    return convert._sampling(msg, base)


def test_sampling_is_shared_per_message_and_base_with_the_values_of_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(convert, "_SHARED_SAMPLING", {})
    base = SamplingParams(temperature=0.7, max_tokens=20, stop_strings=("\n",))
    other_base = SamplingParams(temperature=0.2, top_k=5)
    msg = pb.Sampling(temperature=1.0, max_tokens=64)
    first = convert.sampling_from_pb(msg, base)
    assert first == _fresh_sampling(msg, base)
    assert first.temperature == 1.0 and first.max_tokens == 64 and first.stop_strings == ("\n",)
    assert convert.sampling_from_pb(pb.Sampling(temperature=1.0, max_tokens=64), base) is first
    # The same message on another base falls back to that base's values.
    elsewhere = convert.sampling_from_pb(msg, other_base)
    assert elsewhere == _fresh_sampling(msg, other_base) and elsewhere.top_k == 5
    # A field set to its zero value is set (presence), and differs from one left unset.
    zero = convert.sampling_from_pb(pb.Sampling(temperature=0.0), base)
    assert zero.temperature == 0.0 and zero.max_tokens == 20
    assert convert.sampling_from_pb(pb.Sampling(), base) is base
    stops = pb.Sampling(stop_strings=["a", "b"], stop_token_ids=[3])
    assert convert.sampling_from_pb(stops, base) == _fresh_sampling(stops, base)
    assert convert.sampling_from_pb(stops, base).stop_strings == ("a", "b")


def test_an_equal_base_that_is_another_object_gets_its_own_result() -> None:
    """Bases equal in value can differ (-0.0 == 0.0): each gets exactly what a fresh build
    from it gives, not what an equal one got."""
    positive, negative = SamplingParams(temperature=0.0), SamplingParams(temperature=-0.0)
    assert positive == negative
    msg = pb.Sampling(max_tokens=7)
    from_positive = convert.sampling_from_pb(msg, positive)
    from_negative = convert.sampling_from_pb(msg, negative)
    assert math.copysign(1.0, from_positive.temperature) == 1.0
    assert math.copysign(1.0, from_negative.temperature) == -1.0
    assert convert.sampling_from_pb(pb.Sampling(), negative) is negative


def test_the_shared_sampling_table_is_bounded_in_entries_message_and_base_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client sending ever-new settings, huge stop strings, or sessions whose defaults carry
    huge stop strings, cannot grow it: it starts over when full, and keeps neither a long
    message nor a large base (an entry keeps its base alive)."""
    table: dict[object, object] = {}
    monkeypatch.setattr(convert, "_SHARED_SAMPLING", table)
    base = SamplingParams()
    for n in range(convert._SHARED_SAMPLING_MAX + 50):
        msg = pb.Sampling(max_tokens=n + 1)
        assert convert.sampling_from_pb(msg, base).max_tokens == n + 1
        assert 0 < len(table) <= convert._SHARED_SAMPLING_MAX
    assert len(table) == 50  # started over once full, and kept on sharing
    table.clear()
    long = pb.Sampling(stop_strings=["x" * (convert._SHARED_SAMPLING_BYTES + 1)])
    assert convert.sampling_from_pb(long, base).stop_strings == (long.stop_strings[0],)
    large = SamplingParams(stop_strings=("y" * (convert._SHARED_SAMPLING_BYTES + 1),))
    assert convert.sampling_from_pb(pb.Sampling(max_tokens=3), large).max_tokens == 3
    assert table == {}

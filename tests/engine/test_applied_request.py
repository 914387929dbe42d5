"""A session's last applied request through its checkpoint's JSON and back."""

from __future__ import annotations

import dataclasses
import json

from service.engine.applied_request import from_record, to_record
from service.engine.feed import FeedOutcome
from service.engine.generation import GeneratedToken, GenerationLog
from service.runtime.sampler import SamplingParams
from service.runtime.step_batch import Prediction
from service.sessions.session import AppliedRequest


def _through_json(applied: AppliedRequest) -> AppliedRequest | None:
    return from_record(json.loads(json.dumps(to_record(applied))))


def test_a_feeds_reply_comes_back_whole() -> None:
    outcome = FeedOutcome(
        7,
        Prediction(top_ids=[3, 0, 255], top_probs=[0.5, 0.25, 0.125]),
        [Prediction(top_ids=[1], top_probs=[1.0]), Prediction(values=(0.5, -2.0))],
    )
    back = _through_json(AppliedRequest("r-1", 5, outcome))
    assert back is not None and (back.request_id, back.position) == ("r-1", 5)
    assert isinstance(back.reply, FeedOutcome)
    assert back.reply.position == 7
    # Tuples, as the runner makes them: a kept reply's numbers are not the collector's.
    assert back.reply.prediction == Prediction(
        top_ids=(3, 0, 255), top_probs=(0.5, 0.25, 0.125), values=()
    )
    assert back.reply.per_position == [
        Prediction(top_ids=(1,), top_probs=(1.0,), values=()),
        Prediction(top_ids=(), top_probs=(), values=(0.5, -2.0)),
    ]


def test_every_field_of_a_prediction_is_recorded() -> None:
    """The record is written field by field (not `dataclasses.asdict`, ~16x the cost): a field
    added to Prediction must be added to it too, or this fails."""
    every = Prediction(top_ids=(1, 2), top_probs=(0.75, 0.25), values=(3.0,))
    outcome = FeedOutcome(1, every)
    record = to_record(AppliedRequest("r", 0, outcome))
    assert record is not None
    written = record["feed"]["prediction"]
    assert set(written) == {f.name for f in dataclasses.fields(Prediction)}
    assert written == {k: list(v) for k, v in dataclasses.asdict(every).items()}


def test_a_generations_log_comes_back_whole() -> None:
    params = SamplingParams(temperature=0.5, top_k=4, stop_strings=("x",), max_tokens=3)
    log = GenerationLog(
        params, [GeneratedToken(65, "A", 3, None), GeneratedToken(66, "B", 4, "max_tokens")], True
    )
    back = _through_json(AppliedRequest("g-1", 2, log))
    assert back is not None and isinstance(back.reply, GenerationLog)
    assert back.reply.params == params and back.reply.finished
    assert back.reply.tokens == log.tokens


def test_no_request_is_no_record() -> None:
    assert to_record(None) is None and from_record(None) is None

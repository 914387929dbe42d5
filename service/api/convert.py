"""Protobuf ↔ core conversions. The only place that knows both shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from service.engine.feed import PredictionOptions
from service.engine.generation import (
    FINISH_MAX_TOKENS,
    FINISH_STOP_STRING,
    FINISH_STOP_TOKEN,
    GeneratedToken,
)
from service.engine.model_input import ModelInput, one_token
from service.errors import InvalidArgument
from service.models import ByteTokenizer
from service.pb.seqserve.v1 import types_pb2 as pb
from service.pb.seqserve.v1.session_service_pb2 import CreateSessionRequest, ForkSessionRequest
from service.runtime.sampler import DEFAULT_SAMPLING, SAMPLING_FIELDS, SamplingParams
from service.runtime.step_batch import Prediction
from service.sessions.session import Session

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FINISH_STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FINISH_STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FINISH_MAX_TOKENS: pb.FINISH_REASON_MAX_TOKENS,
}


def input_from_pb(msg: pb.Input) -> ModelInput:
    kind = msg.WhichOneof("kind")
    if kind == "tokens":
        ids = msg.tokens.ids
        return one_token(ids[0]) if len(ids) == 1 else ModelInput(tokens=list(ids))
    if kind == "text":
        return ModelInput(text=msg.text)
    if kind == "frames":
        return ModelInput(frames=list(msg.frames.values))
    raise InvalidArgument("input is empty: set one of tokens, text or frames")


def options_from_pb(msg: pb.PredictionOptions) -> PredictionOptions:
    return PredictionOptions.of(msg.top_k, msg.per_position)


def sampling_from_pb(msg: pb.Sampling, base: SamplingParams | None = None) -> SamplingParams:
    """Fields the message leaves unset (or repeated fields left empty) fall back to `base`
    (the session's default, or the defaults of `SamplingParams`).

    Shared (they are immutable) for a small message seen with the same base object before:
    nearly every Generate call of an app asks for the same few settings, and building them
    costs ~2.7 µs a call (`dataclasses.replace`) against ~0.5 µs for the lookup. Keyed by the
    base's identity, not its value, so the result is exactly what a fresh build would give
    (an equal base can differ: -0.0 against 0.0); an entry keeps its base alive, so only small
    ones are kept, and the table starts over when full."""
    base = base or DEFAULT_SAMPLING
    wire = msg.SerializeToString(deterministic=True)
    if len(wire) > _SHARED_SAMPLING_BYTES:
        return _sampling(msg, base)
    key = (id(base), wire)
    shared = _SHARED_SAMPLING.get(key)
    if shared is not None and shared[0] is base:
        return shared[1]
    params = _sampling(msg, base)
    if _small(base):
        if len(_SHARED_SAMPLING) >= _SHARED_SAMPLING_MAX:
            _SHARED_SAMPLING.clear()
        _SHARED_SAMPLING[key] = (base, params)
    return params


_SHARED_SAMPLING: dict[tuple[int, bytes], tuple[SamplingParams, SamplingParams]] = {}
_SHARED_SAMPLING_MAX = 256  # (base, message) pairs kept at once
_SHARED_SAMPLING_BYTES = 256  # a longer message (many stop strings) is built each time


def _small(params: SamplingParams) -> bool:
    """Whether a base is small enough to keep alive in the table: its stop strings, the only
    part a client can make large (up to the message size limit), total 256 bytes at most."""
    return sum(len(s) for s in params.stop_strings) <= _SHARED_SAMPLING_BYTES


def _sampling(msg: pb.Sampling, base: SamplingParams) -> SamplingParams:
    changes: dict[str, object] = {}
    for name in SAMPLING_FIELDS:
        value = getattr(msg, name)
        if isinstance(value, (str, int, float)):
            if msg.HasField(name):
                changes[name] = value
        elif len(value):
            changes[name] = tuple(value)
    if not changes:
        return base  # frozen: shared, not one copy per session
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def sampling_to_pb(params: SamplingParams) -> pb.Sampling:
    return pb.Sampling(**params.as_dict())


_NANOS_PER_SECOND = 1_000_000_000


def duration_seconds(msg: Duration, what: str) -> float:
    """A Duration field as seconds, refused (InvalidArgument naming `what`) where protobuf's
    Duration does not allow it: nanos in (-1e9, 1e9), of the sign of seconds when both are
    set. (5 s and 2e9 nanos was taken as 7 s; 1 s and -1e9 nanos as 0, then the default.)"""
    seconds, nanos = msg.seconds, msg.nanos
    if not -_NANOS_PER_SECOND < nanos < _NANOS_PER_SECOND:
        raise InvalidArgument(
            f"{what} is not a valid Duration: nanos must be within ±999,999,999, got {nanos}"
        )
    if (seconds < 0 < nanos) or (nanos < 0 < seconds):
        raise InvalidArgument(
            f"{what} is not a valid Duration: nanos must have the sign of seconds, got "
            f"seconds={seconds}, nanos={nanos}"
        )
    return seconds + nanos / _NANOS_PER_SECOND


def ttl_seconds(request: CreateSessionRequest | ForkSessionRequest) -> float | None:
    """A request's `ttl` in seconds; None when unset (the default; a fork: its parent's). Set,
    it is checked as it is (0 included) against the allowed range."""
    return duration_seconds(request.ttl, "ttl") if request.HasField("ttl") else None


def session_to_pb(session: Session, clock_now: float, wall_now: float) -> pb.Session:
    created, expires = Timestamp(), Timestamp()
    created.FromNanoseconds(int(session.created_at * 1e9))
    expires.FromNanoseconds(int(session.expires_at(clock_now, wall_now) * 1e9))
    ttl = Duration()
    ttl.FromNanoseconds(int(session.ttl_seconds * 1e9))
    if session.closed:
        state = pb.SESSION_STATE_CLOSED
    elif session.slot is None:
        state = pb.SESSION_STATE_SPILLED
    else:
        state = pb.SESSION_STATE_ACTIVE
    return pb.Session(
        session_id=session.session_id,
        model=session.model,
        version=session.version,
        fingerprint=session.fingerprint,
        position=session.position,
        created_at=created,
        expires_at=expires,
        ttl=ttl,
        default_sampling=sampling_to_pb(session.default_sampling),
        state=state,
        seed=session.seed,
        parent_session_id=session.parent_session_id,
    )


def fill_prediction(
    msg: pb.Prediction, pred: Prediction, position: int, tokenizer: ByteTokenizer | None
) -> None:
    """Write `pred` into `msg` in place (building nested messages and copying them in costs
    about twice as much on the hot path)."""
    msg.position = position
    if pred.values:
        msg.regression.values.extend(pred.values)
        return
    assert tokenizer is not None
    msg.tokens.SetInParent()
    top = msg.tokens.top
    decode = tokenizer.decode_one
    for token_id, prob in zip(pred.top_ids, pred.top_probs, strict=True):
        entry = top.add()  # then fields one by one: ~20% cheaper than add(**fields)
        entry.id, entry.prob, entry.text = token_id, prob, decode(token_id)


def prediction_to_pb(
    pred: Prediction, position: int, tokenizer: ByteTokenizer | None
) -> pb.Prediction:
    msg = pb.Prediction()
    fill_prediction(msg, pred, position, tokenizer)
    return msg


def per_position_to_pb(
    preds: Sequence[Prediction], last_position: int, tokenizer: ByteTokenizer | None
) -> list[pb.Prediction]:
    first = last_position - len(preds) + 1
    return [prediction_to_pb(p, first + i, tokenizer) for i, p in enumerate(preds)]


def fill_token(msg: pb.GeneratedToken, token: GeneratedToken) -> None:
    """Write `token` into `msg` in place (a reply's field: setting any field marks it set,
    zeros included). Building a GeneratedToken and copying it in cost twice as much, once
    per generated token."""
    msg.id, msg.text, msg.finish_reason = token.token_id, token.text, _FINISH[token.finish_reason]

"""What the client returns: plain frozen dataclasses (no protobufs), and the request pieces it
builds from plain arguments."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import types_pb2 as types


class TopToken(NamedTuple):
    """One candidate next token (a tuple: `id, prob, text = top[0]` works)."""

    id: int
    prob: float
    text: str


@dataclass(frozen=True)
class Prediction:
    """What the session predicts after its last input: `top` for a token model (most likely
    first), `values` for a regression model (e.g. co2-gru's next-week CO2)."""

    position: int  # inputs the session has consumed
    top: list[TopToken]
    values: list[float]


TokenPrediction = Prediction  # the name before there were regression models


@dataclass(frozen=True)
class GeneratedPiece:
    token_id: int
    text: str
    position: int
    finish_reason: str | None  # "stop_token" | "stop_string" | "max_tokens" on the last


@dataclass(frozen=True)
class SamplingDefaults:
    """A session's default sampling; None: not set (the server's default applies)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    version: int  # the exact version the session is pinned to
    fingerprint: str  # of that version's weights and architecture
    position: int
    state: str  # "active" | "spilled" | "closed"
    seed: int  # the RNG's starting seed: the same seed repeats a generation
    ttl_seconds: float
    created_at: datetime | None
    expires_at: datetime | None
    default_sampling: SamplingDefaults
    parent_session_id: str = ""  # set on forks


@dataclass(frozen=True)
class VersionInfo:
    version: int
    status: str  # "ok" | "refused" (its status_reason says why)
    status_reason: str
    cell: str  # "lstm" | "gru"
    fingerprint: str
    loaded: bool
    live_sessions: int
    manifest: dict[str, Any]  # the version's manifest.json


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: list[int]
    aliases: dict[str, int]
    default_version: int  # what version "" resolves to (alias `production`, else latest)
    details: list[VersionInfo] = field(default_factory=list)  # filled by `get_model`


def make_input(
    text: str | None = None,
    tokens: Sequence[int] | None = None,
    frames: Sequence[float] | None = None,
) -> types.Input:
    """The Input message. An argument of the wrong type (bytes for `text`, a float among
    `tokens`, ...) raises TypeError naming it, a value out of its field's range ValueError
    (`outcome.checked_locally` makes either an InvalidArgumentError)."""
    if sum(x is not None for x in (text, tokens, frames)) != 1:
        raise ValueError("give exactly one of text, tokens or frames")
    if text is not None:
        return types.Input(text=require_str("text", text))
    if tokens is not None:
        try:
            return types.Input(tokens=types.Tokens(ids=list(tokens)))
        except TypeError as exc:
            raise wrong_type("tokens", "a sequence of ints", exc) from None
    try:
        return types.Input(frames=types.Frames(values=list(frames)))  # type: ignore[arg-type]
    except TypeError as exc:
        raise wrong_type("frames", "a sequence of numbers", exc) from None


def make_options(top_k: int) -> types.PredictionOptions:
    """A feed's PredictionOptions (TypeError or ValueError as for `make_input`)."""
    try:
        return types.PredictionOptions(top_k=top_k)
    except TypeError as exc:
        raise wrong_type("top_k", "an int", exc) from None


def make_sampling(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
) -> types.Sampling:
    """The Sampling message; None leaves a field unset (TypeError or ValueError as for
    `make_input`)."""
    msg = types.Sampling(stop_strings=_strings("stop", stop))
    try:
        msg.stop_token_ids.extend(list(stop_token_ids))
    except TypeError as exc:
        raise wrong_type("stop_token_ids", "a sequence of ints", exc) from None
    set_field(msg, "temperature", temperature, "a number")
    set_field(msg, "top_k", top_k, "an int")
    set_field(msg, "top_p", top_p, "a number")
    set_field(msg, "max_tokens", max_tokens, "an int")
    return msg


def set_field(msg: Any, name: str, value: object, kind: str) -> None:
    """`msg.<name> = value` unless `value` is None; the argument of that name is `kind`."""
    if value is None:
        return
    try:
        setattr(msg, name, value)
    except TypeError as exc:
        raise wrong_type(name, kind, exc) from None


def require_str(name: str, value: object) -> str:
    """`value`, the argument `name`, if it is a str (protobuf would take bytes as UTF-8)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def wrong_type(name: str, kind: str, exc: TypeError) -> TypeError:
    """Protobuf's (or Python's) TypeError about the argument `name`, saying which one it is."""
    return TypeError(f"{name} must be {kind}: {exc}")


def _strings(name: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str | bytes):  # a sequence, of characters: not what was meant
        raise TypeError(f"{name} must be a sequence of str, not a {type(values).__name__}")
    try:
        strings = list(values)
    except TypeError as exc:
        raise wrong_type(name, "a sequence of str", exc) from None
    for value in strings:
        if not isinstance(value, str):
            raise TypeError(
                f"{name} must be a sequence of str, not one holding {type(value).__name__}"
            )
    return strings


def prediction_from_pb(msg: types.Prediction) -> Prediction:
    if msg.WhichOneof("kind") == "regression":
        return Prediction(msg.position, [], list(msg.regression.values))
    return Prediction(msg.position, [TopToken(t.id, t.prob, t.text) for t in msg.tokens.top], [])


_FINISH = {
    types.FINISH_REASON_UNSPECIFIED: None,
    types.FINISH_REASON_STOP_TOKEN: "stop_token",
    types.FINISH_REASON_STOP_STRING: "stop_string",
    types.FINISH_REASON_MAX_TOKENS: "max_tokens",
}


def piece_from_pb(token: types.GeneratedToken, position: int) -> GeneratedPiece:
    return GeneratedPiece(token.id, token.text, position, _FINISH[token.finish_reason])


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _time(msg: Any, name: str) -> datetime | None:
    return getattr(msg, name).ToDatetime() if msg.HasField(name) else None


def session_from_pb(msg: types.Session) -> SessionInfo:
    sampling = msg.default_sampling
    return SessionInfo(
        session_id=msg.session_id,
        model=msg.model,
        version=msg.version,
        fingerprint=msg.fingerprint,
        position=msg.position,
        state=types.SessionState.Name(msg.state).removeprefix("SESSION_STATE_").lower(),
        seed=msg.seed,
        ttl_seconds=msg.ttl.ToNanoseconds() / 1e9,
        created_at=_time(msg, "created_at"),
        expires_at=_time(msg, "expires_at"),
        default_sampling=SamplingDefaults(
            temperature=_opt(sampling, "temperature"),
            top_k=_opt(sampling, "top_k"),
            top_p=_opt(sampling, "top_p"),
            max_tokens=_opt(sampling, "max_tokens"),
            stop=tuple(sampling.stop_strings),
            stop_token_ids=tuple(sampling.stop_token_ids),
        ),
        parent_session_id=msg.parent_session_id,
    )


def model_from_pb(msg: reg_pb.ModelSummary | reg_pb.ModelDetail) -> ModelInfo:
    if isinstance(msg, reg_pb.ModelSummary):
        return ModelInfo(msg.name, sorted(msg.versions), dict(msg.aliases), msg.default_version)
    details = [
        VersionInfo(
            version=v.version,
            status=reg_pb.VersionStatus.Name(v.status).removeprefix("VERSION_STATUS_").lower(),
            status_reason=v.status_reason,
            cell=reg_pb.CellType.Name(v.cell).removeprefix("CELL_TYPE_").lower(),
            fingerprint=v.fingerprint,
            loaded=v.loaded,
            live_sessions=v.live_sessions,
            manifest=json.loads(v.manifest_json) if v.manifest_json else {},
        )
        for v in msg.versions
    ]
    versions = sorted(v.version for v in details)
    return ModelInfo(msg.name, versions, dict(msg.aliases), msg.default_version, details)

"""A feed, the engine's unit of work: input for one session (a Step request, or one Stream
item), with the options that shape its prediction, and what it returns.

Nouns used throughout: an API *item* (one entry of a Stream message) becomes a *feed* here; the
step scheduler runs each feed as one *row* of a batched step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.engine.model_input import ModelInput
from service.errors import InvalidArgument
from service.models import ByteTokenizer
from service.runtime.step_batch import Prediction

MAX_REQUEST_ID_BYTES = 128  # a request id must fit, whole, in a journal record


def check_request_id(request_id: str) -> None:
    """INVALID_ARGUMENT for a request id too long to be remembered for a retry."""
    if len(request_id) > MAX_REQUEST_ID_BYTES // 4 and (
        len(request_id.encode("utf-8")) > MAX_REQUEST_ID_BYTES
    ):
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")


@dataclass(frozen=True)
class PredictionOptions:
    top_k: int = 0  # 0 = the server default
    per_position: bool = False

    @staticmethod
    def of(top_k: int, per_position: bool) -> PredictionOptions:
        """The options for these values, shared (they are immutable): a request's options
        are converted for every item, and nearly every item asks for the same few."""
        key = (top_k, per_position)
        options = _SHARED_OPTIONS.get(key)
        if options is None:
            options = PredictionOptions(top_k, per_position)
            if len(_SHARED_OPTIONS) < _SHARED_OPTIONS_MAX:
                _SHARED_OPTIONS[key] = options
        return options


_SHARED_OPTIONS: dict[tuple[int, bool], PredictionOptions] = {}
_SHARED_OPTIONS_MAX = 256  # distinct (top_k, per_position) pairs kept; others are built each time


@dataclass(slots=True)  # not frozen: its __init__ would cost 4x (one is built per item)
class Feed:
    session_id: str
    input: ModelInput
    options: PredictionOptions = PredictionOptions()
    expected_position: int | None = None  # see StepRequest.expected_position
    request_id: str = ""  # names the feed for a retry


@dataclass(slots=True)  # every idle session keeps its last one (for a retry)
class FeedOutcome:
    """A feed's reply. It names no session: a session keeps its last one (for a retry), and a
    reference back would make every fed session a reference cycle, freed only by the cycle
    collector (whose collections at 100,000 sessions stall the loop for half a second)."""

    position: int  # inputs the session has consumed after this feed
    prediction: Prediction
    per_position: Sequence[Prediction] = ()  # () when not asked for: no list per session
    tokenizer: ByteTokenizer | None = None  # decodes the prediction's token ids

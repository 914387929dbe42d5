"""What a step returns to the API layer, and the per-request options that shape it."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.models import ByteTokenizer
from service.runtime.step_batch import Prediction
from service.sessions.session import Session


@dataclass(frozen=True)
class PredictionOptions:
    top_k: int = 0  # 0 = the server default
    per_position: bool = False


@dataclass
class StepOutcome:
    session: Session
    position: int  # inputs the session has consumed after this step
    prediction: Prediction
    per_position: list[Prediction] = field(default_factory=list)
    tokenizer: ByteTokenizer | None = None  # decodes the prediction's token ids

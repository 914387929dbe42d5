"""LSTM and GRU sequence models: input layer → stacked recurrent cell → head."""

from service.models.config import CellKind, HeadKind, InputKind, ModelConfig
from service.models.sequence_model import RecurrentState, SequenceModel
from service.models.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "CellKind",
    "HeadKind",
    "InputKind",
    "ModelConfig",
    "RecurrentState",
    "SequenceModel",
]

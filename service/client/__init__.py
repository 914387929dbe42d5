"""The Python client a client app uses: open a session, feed it, read predictions, generate.

Importing it needs grpcio and protobuf only (no torch, numpy or the engine)."""

from service.client.client import ClientSession, SeqServeClient
from service.client.credentials import Credentials, PlaintextToken
from service.client.errors import SeqServeError
from service.client.results import (
    GeneratedPiece,
    ModelInfo,
    Prediction,
    SessionInfo,
    TokenPrediction,
    TopToken,
    VersionInfo,
)
from service.client.retry import RetryPolicy

__all__ = [
    "ClientSession",
    "Credentials",
    "GeneratedPiece",
    "ModelInfo",
    "PlaintextToken",
    "Prediction",
    "RetryPolicy",
    "SeqServeClient",
    "SeqServeError",
    "SessionInfo",
    "TokenPrediction",
    "TopToken",
    "VersionInfo",
]

"""The Python client a client app uses: open a session, feed it, read predictions, generate."""

from service.client.client import ClientSession, SeqServeClient, TokenPrediction

__all__ = ["ClientSession", "SeqServeClient", "TokenPrediction"]

"""`--client-mux`: the load an ordinary app puts on the server through the Python client.

Every session is a handle on one `SeqServeClient` (multiplexing, the default) and runs its own
closed loop: `await session.feed(...)`, think, repeat. Nothing here groups the feeds: the client
coalesces the feeds awaited at once into one Stream message per event-loop tick (all sessions
share the client's routing key), so the report's items per message show how well it does.
Errors are the client's (`service.client.errors`), counted by code after its own retries.
Its channel, like the load test's own, connects to the target only (no proxy from the
environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from service.client.client import SeqServeClient
from service.client.credentials import Credentials
from service.client.errors import SeqServeError
from service.client.session import ClientSession as Handle
from service.loadtest.config import LoadConfig
from service.loadtest.drivers import ClientSession
from service.loadtest.recorder import LoadRecorder
from service.loadtest.target import CONNECT_OPTIONS, ModelInfo
from service.pb.seqserve.v1 import types_pb2 as types


class ClientMuxDriver:
    def __init__(
        self,
        sessions: list[ClientSession],
        config: LoadConfig,
        model: ModelInfo,
        recorder: LoadRecorder,
        stop: asyncio.Event,
        credentials: Credentials | None = None,
    ) -> None:
        self._sessions = sessions
        self._config = config
        self._model = model
        self._recorder = recorder
        self._stop = stop
        self._credentials = credentials

    async def run(self) -> None:
        async with SeqServeClient(
            self._config.target, credentials=self._credentials, channel_options=CONNECT_OPTIONS
        ) as client:
            assert client.mux is not None
            rec = self._recorder
            client.mux.on_send = lambda items: rec.message_sent(time.perf_counter(), items)
            await asyncio.gather(*(self._loop(client, s) for s in self._sessions))

    async def _loop(self, client: SeqServeClient, session: ClientSession) -> None:
        """One session's closed loop, as an app would write it."""
        start = self._config.history if session.created else 0
        handle = Handle(client, types.Session(session_id=session.session_id, position=start))
        think = random.Random(session.rng.random())
        mean = self._config.think_ms / 1000.0
        n = self._config.tokens_per_message
        while not self._stop.is_set():
            chunk = self._model.random_input(session.rng, n)
            sent = time.perf_counter()
            try:
                if chunk.HasField("tokens"):
                    await handle.feed(tokens=chunk.tokens.ids, top_k=self._config.top_k)
                else:
                    await handle.feed(frames=chunk.frames.values, top_k=self._config.top_k)
                self._recorder.fed(sent, time.perf_counter(), n)
            except SeqServeError as err:
                self._recorder.error("feed", err.code().name, err.message, time.perf_counter())
                if not session.created:  # an id the server never issued: it stays an error
                    await self._pause(0.05)
            if mean > 0:
                await self._pause(think.uniform(0.5 * mean, 1.5 * mean))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

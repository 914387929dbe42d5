"""The open loop (`--rate R`): requests arrive on a schedule, whatever the server's speed.

Arrival times are a Poisson process: exponential gaps with mean 1/R, drawn from the seeded RNG
up front, never pushed back by a slow reply. Each arrival takes an idle session (a session runs
one request at a time) and sends one request on it: a `Step` feeding `tokens_per_message`
inputs or, with probability `generate_fraction`, a `Generate` with them as the prompt. With
every session busy, arrivals wait in order for one to come free; one sent more than `late_ms`
after its arrival is counted late, and one still waiting `max_lag_seconds` after it (or when
the load stops) is dropped: counted, never sent.

Latency is measured from the arrival (the intended send time), not from the actual send, so
time spent waiting for a session counts: the load generator's own backlog cannot hide a slow
server (no coordinated omission). The send lag (actual send − arrival) is recorded as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque

import grpc

from service.client.client import route_metadata
from service.loadtest.config import LoadConfig
from service.loadtest.drivers import ClientSession, generate_rpc
from service.loadtest.recorder import LoadRecorder
from service.loadtest.target import ModelInfo
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types

_SEED_SALT = 0x0F3E_100B  # the arrival schedule's stream, apart from the sessions' own
_LONG_GAP_SECONDS = 0.05  # gaps longer than this wait on the stop signal, not a plain sleep


class OpenLoopDriver:
    def __init__(
        self,
        stub: pb_grpc.SessionServiceStub,
        sessions: list[ClientSession],
        config: LoadConfig,
        model: ModelInfo,
        recorder: LoadRecorder,
        stop: asyncio.Event,
        start: float | None = None,
    ) -> None:
        """`start`: when the schedule begins (`time.perf_counter()`; default: when `run`
        starts). The load's own start, so a driver that starts late, behind a busy loop, sends
        the arrivals it missed at once (and late) instead of shifting the schedule."""
        assert config.rate > 0, "the open loop needs a rate"
        self._start = start
        self._stub = stub
        self._config = config
        self._model = model
        self._recorder = recorder
        self._stop = stop
        self._arrivals = random.Random(config.seed ^ _SEED_SALT)  # the schedule: its own stream
        self._turns = random.Random(config.seed ^ _SEED_SALT ^ 1)  # feed or generate, in order
        self._idle: deque[ClientSession] = deque(sessions)
        self._backlog: deque[float] = deque()  # arrival times not yet sent, oldest first
        self._requests: set[asyncio.Task[None]] = set()
        self._late = config.late_ms / 1000.0
        self._generates = model.input_kind == "tokens" and config.generate_fraction > 0
        self._options = types.PredictionOptions(top_k=config.top_k)
        self._sampling = types.Sampling(
            max_tokens=config.max_tokens, temperature=config.temperature
        )

    async def run(self) -> None:
        """Schedule arrivals until `stop`; then drop what never got a session and wait for the
        requests in flight (the caller bounds that wait)."""
        due = time.perf_counter() if self._start is None else self._start
        try:
            while True:
                due += self._arrivals.expovariate(self._config.rate)
                if self._stop.is_set():
                    break
                await self._sleep(due - time.perf_counter())
                if self._stop.is_set():
                    break
                self._recorder.arrived(due)
                self._backlog.append(due)
                self._start_ready()
            while self._backlog:  # the load stopped before these found a session
                self._recorder.drop(self._backlog.popleft())
            # Due before the load stopped, but this loop, behind (a busy event loop, a starved
            # process), had not issued them yet: dropped, not left out of the arrivals.
            until = min(self._recorder.window_end, time.perf_counter())
            while due < until:
                self._recorder.arrived(due)
                self._recorder.drop(due)
                due += self._arrivals.expovariate(self._config.rate)
            if self._requests:
                await asyncio.gather(*self._requests, return_exceptions=True)
        finally:
            for task in self._requests:
                task.cancel()

    async def _sleep(self, delay: float) -> None:
        """Until the next arrival. Behind schedule it is issued at once, after a yield so that
        replies are seen; a long gap ends early when the load stops."""
        if delay < _LONG_GAP_SECONDS:
            await asyncio.sleep(max(0.0, delay))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    def _start_ready(self) -> None:
        """Send the oldest waiting arrivals on idle sessions; drop those waited too long."""
        now = time.perf_counter()
        while self._backlog:
            due = self._backlog[0]
            if now - due > self._config.max_lag_seconds:
                self._recorder.drop(self._backlog.popleft())
                continue
            if not self._idle or self._stop.is_set():
                return
            self._backlog.popleft()
            session = self._idle.popleft()
            task = asyncio.create_task(self._request(session, due))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    async def _request(self, session: ClientSession, due: float) -> None:
        cfg, rec = self._config, self._recorder
        sent = time.perf_counter()
        try:
            if sent - due > cfg.max_lag_seconds:
                # Given a session in time, but this task ran later than that (a busy event
                # loop, a starved process): still waiting at max lag, so dropped, as
                # `_start_ready` would.
                rec.drop(due)
                return
            rec.started(due, sent, late=sent - due > self._late)
            # Counted by its arrival, like every open-loop count: one due just before the
            # window's end and sent just after it is one of the window's `sent`, so it is one
            # of its messages.
            rec.message_sent(due, 0)
            inputs = self._model.random_input(session.rng, cfg.tokens_per_message)
            if self._generates and self._turns.random() < cfg.generate_fraction:
                await generate_rpc(
                    self._stub, session, inputs, self._sampling, rec, due, cfg.tokens_per_message
                )
            else:
                await self._step(session, inputs, due)
        finally:
            self._idle.append(session)
            self._start_ready()

    async def _step(self, session: ClientSession, inputs: types.Input, due: float) -> None:
        request = pb.StepRequest(session_id=session.session_id, input=inputs, options=self._options)
        try:
            await self._stub.Step(request, metadata=route_metadata(session.session_id))
        except grpc.aio.AioRpcError as exc:
            self._recorder.error("step", exc.code().name, exc.details() or "", time.perf_counter())
            return
        self._recorder.fed(due, time.perf_counter(), self._config.tokens_per_message)

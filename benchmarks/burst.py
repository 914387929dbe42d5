"""Generations started at once: time to first token when N Generate calls arrive together.

The closed-loop Generate rows measure time to first token while other generations stream
(each new call joins a running batch). This is the other case: N idle sessions, then N
`Generate` calls sent in the same tick, each timed from its send to its first token; the
round ends when every generation has finished, and the next starts on idle sessions again.
Run against the service and against the bare echo server (which answers Generate with canned
tokens), it shows what the service adds to gRPC's own cost of taking in N calls at once.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import grpc

from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types


@dataclass(frozen=True)
class Burst:
    sessions: int
    rounds: int
    ttft_seconds: list[float]  # every generation's send → first token, all rounds
    tokens: int
    seconds: float  # the rounds' wall time, added up

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttft_seconds)

    @property
    def ttft_p99(self) -> float:
        ordered = sorted(self.ttft_seconds)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def generation_burst(
    target: str,
    model: str,
    sessions: int = 64,
    rounds: int = 8,
    max_tokens: int = 64,
    warmup_rounds: int = 1,
) -> Burst:
    """`rounds` bursts of `sessions` Generate calls sent together (after `warmup_rounds`)."""
    sampling = types.Sampling(temperature=1.0, max_tokens=max_tokens)
    prompt = types.Input(tokens=types.Tokens(ids=[72, 105]))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        made = await asyncio.gather(
            *(
                stub.CreateSession(pb.CreateSessionRequest(model=model, prefix=prompt))
                for _ in range(sessions)
            )
        )
        ids = [m.session.session_id for m in made]

        async def generate(session_id: str) -> tuple[float, int]:
            sent = time.perf_counter()
            first, count = 0.0, 0
            request = pb.GenerateRequest(session_id=session_id, sampling=sampling)
            async for _token in stub.Generate(request):
                if count == 0:
                    first = time.perf_counter() - sent
                count += 1
            return first, count

        ttft: list[float] = []
        tokens, seconds = 0, 0.0
        for round_no in range(warmup_rounds + rounds):
            await asyncio.sleep(0.2)  # the previous round's leases let go, the loop idle
            started = time.perf_counter()
            results = await asyncio.gather(*(generate(s) for s in ids))
            if round_no < warmup_rounds:
                continue
            seconds += time.perf_counter() - started
            ttft.extend(first for first, _ in results)
            tokens += sum(count for _, count in results)
        for session_id in ids:
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    return Burst(sessions, rounds, ttft, tokens, seconds)

"""Real traffic for the live-metrics tests, and a tally of it to hold the server's counters to.

One round opens a few sessions on the `tok` model and forks one, feeds them all at once over
Step, feeds and generates for them in one Stream message, generates for them again over
concurrent Generate calls, makes one call that fails NOT_FOUND, and closes them. Requests for
different sessions are in flight together, so the scheduler batches them: most steps carry more
than one row. The tally counts what the client sent and received; the server's metrics must
agree with it exactly.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import grpc

from service.client.client import ClientSession, SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

MODEL = "tok"
FEED = [1, 2, 3]  # a Step's input
STREAM_FEED = [4, 5]  # a Stream input item's input
PROMPT = [6, 7]  # a Generate call's prompt


@dataclass
class Tally:
    """What the client did; each field names the metric it should match."""

    created: int = 0  # session_events{event="created"}
    forked: int = 0  # session_events{event="forked"}
    closed: int = 0  # session_events{event="closed"}
    steps: int = 0  # step_latency count: Step calls and Stream input items
    prompts: int = 0  # fed rows that are no step request: prompts ahead of a generation
    tokens_fed: int = 0  # tokens_in
    generations: int = 0  # time_to_first_token count: generations that produced a token
    tokens_generated: int = 0  # tokens_generated; inter-token count is this less generations
    rpcs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, code) -> calls
    session_ids: set[str] = field(default_factory=set)

    @property
    def fed_rows(self) -> int:
        """Feed rows the scheduler ran: each has one queue-wait observation."""
        return self.steps + self.prompts


class Traffic:
    def __init__(self, client: SeqServeClient, *, sessions: int = 4, max_tokens: int = 6) -> None:
        self.client = client
        self.sessions = sessions
        self.max_tokens = max_tokens
        self.tally = Tally()

    async def round(self) -> None:
        opened = await self.open()
        await self.drive(opened)
        await self.fail_not_found()
        await self.close(opened)

    async def open(self) -> list[ClientSession]:
        """`sessions` new sessions, plus a fork of the first."""
        t = self.tally
        opened = list(
            await asyncio.gather(
                *(self.client.create_session(MODEL, seed=i) for i in range(self.sessions))
            )
        )
        t.created += len(opened)
        t.rpcs["CreateSession", "OK"] += len(opened)
        opened.append(await opened[0].fork(seed=99))
        t.forked += 1
        t.rpcs["ForkSession", "OK"] += 1
        t.session_ids.update(s.session_id for s in opened)
        return opened

    async def drive(self, opened: list[ClientSession]) -> None:
        await self._step_all(opened)
        await self._stream_all(opened)
        await self._generate_all(opened)

    async def fail_not_found(self) -> None:
        try:
            await self.client.create_session("no-such-model")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
        else:
            raise AssertionError("creating a session on an unknown model succeeded")
        self.tally.rpcs["CreateSession", "NOT_FOUND"] += 1

    async def close(self, opened: list[ClientSession]) -> None:
        await asyncio.gather(*(s.close() for s in opened))
        self.tally.closed += len(opened)
        self.tally.rpcs["CloseSession", "OK"] += len(opened)

    async def _step_all(self, opened: list[ClientSession]) -> None:
        await asyncio.gather(*(s.feed(tokens=FEED) for s in opened))
        t = self.tally
        t.steps += len(opened)
        t.tokens_fed += len(FEED) * len(opened)
        t.rpcs["Step", "OK"] += len(opened)

    async def _stream_all(self, opened: list[ClientSession]) -> None:
        """One message: for each session a feed, then a generation (in order per session)."""
        items: list[pb.StreamItem] = []
        for i, s in enumerate(opened):
            items.append(
                pb.StreamItem(
                    session_id=s.session_id,
                    request_id=f"feed-{i}",
                    input=types.Input(tokens=types.Tokens(ids=STREAM_FEED)),
                )
            )
            items.append(
                pb.StreamItem(
                    session_id=s.session_id,
                    request_id=f"gen-{i}",
                    generate=types.GenerateSpec(sampling=self._sampling()),
                )
            )
        call = self.client.sessions.Stream()
        await call.write(pb.StreamRequest(items=items))
        await call.done_writing()
        generated: Counter[str] = Counter()
        async for message in call:
            for reply in message.replies:
                assert reply.error.code == 0, reply
                if reply.request_id.startswith("gen-"):
                    generated[reply.request_id] += 1
        t = self.tally
        t.steps += len(opened)
        t.tokens_fed += len(STREAM_FEED) * len(opened)
        t.generations += len(generated)
        t.tokens_generated += sum(generated.values())
        t.rpcs["Stream", "OK"] += 1

    async def _generate_all(self, opened: list[ClientSession]) -> None:
        counts = await asyncio.gather(*(self._generate(s) for s in opened))
        t = self.tally
        t.prompts += len(opened)
        t.tokens_fed += len(PROMPT) * len(opened)
        t.generations += sum(1 for n in counts if n)
        t.tokens_generated += sum(counts)
        t.rpcs["Generate", "OK"] += len(opened)

    async def _generate(self, session: ClientSession) -> int:
        request = pb.GenerateRequest(
            session_id=session.session_id,
            prompt=types.Input(tokens=types.Tokens(ids=PROMPT)),
            sampling=self._sampling(),
        )
        return len([r async for r in self.client.sessions.Generate(request)])

    def _sampling(self) -> types.Sampling:
        return types.Sampling(temperature=1.0, max_tokens=self.max_tokens)

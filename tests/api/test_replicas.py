"""Replicas sharing the Redis state tier, behind nginx running the deploy file: real
`seqserve serve` processes, a real redis-server, a real nginx, all on 127.0.0.1.

- 64 sessions fed through nginx; the replica holding the most is killed with SIGKILL; feeding
  goes on through nginx. Each session's acknowledged inputs are all there, once each, and its
  next prediction is the NumPy reference's over exactly those inputs.
- A replica frozen with SIGSTOP while another takes its session over applies nothing to it
  when it wakes: its queued step is refused (UNAVAILABLE), the session is the other's.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from benchmarks.real_services import NginxServer, RedisServer, free_port
from service.client.client import ClientSession, RetryPolicy, SeqServeClient, route_metadata
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import ReferenceSession, assert_matches_reference, tokens
from .test_lifecycle_restart import ServerProcess

pytestmark = pytest.mark.integration

SESSIONS = 64
ROUNDS_BEFORE, ROUNDS_AFTER = 3, 3


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def replicas(
    store_root: Path, tmp_path: Path, redis_server: RedisServer
) -> Iterator[list[ServerProcess]]:
    procs = _three_replicas(store_root, tmp_path, redis_server.url)
    yield procs
    for proc in procs:
        proc.kill()


def _three_replicas(
    store_root: Path, tmp_path: Path, redis_url: str, *, fixed_ports: bool = False
) -> list[ServerProcess]:
    """Three replicas on the Redis tier; `fixed_ports`: each on a port of its own from the
    start, so one restarted comes back where nginx expects it."""
    return [
        ServerProcess(
            store_root, tmp_path / f"s{i}", tmp_path / f"r{i}", SESSIONS,
            port=free_port() if fixed_ports else 0, extra=("--state-url", redis_url),
        )
        for i in range(3)
    ]  # fmt: skip


def _holder_pid(redis_url: str, session_id: str) -> int:
    holder = redis.Redis.from_url(redis_url).hget(f"seqserve:h:{session_id}", "holder")
    assert holder is not None, session_id
    return int(holder.decode().split(":")[1])


class _Load:
    """SESSIONS sessions fed one token each per round, through `target`, until stopped; what
    each acknowledged is kept for the reference."""

    def __init__(self, client: SeqServeClient) -> None:
        self.client = client
        self.sessions: list[ClientSession] = []
        self.fed: list[list[int]] = []
        self.rounds = 0
        self._stop = asyncio.Event()

    async def open(self) -> None:
        self.sessions = [await self.client.create_session("tok", seed=i) for i in range(SESSIONS)]
        self.fed = [[] for _ in self.sessions]

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.round()

    async def round(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(SESSIONS)))
        self.rounds += 1

    async def _one(self, i: int) -> None:
        token = (i * 13 + self.rounds * 5) % 256
        await self.sessions[i].feed(tokens=[token])
        self.fed[i].append(token)

    def stop(self) -> None:
        self._stop.set()

    async def check(self, store_root: Path) -> None:
        """Every session: its position is its acknowledged inputs, once each; its next
        prediction is the reference's over them."""
        for session, inputs in zip(self.sessions, self.fed, strict=True):
            reply = await self.client.sessions.Step(
                pb.StepRequest(
                    session_id=session.session_id,
                    input=tokens(5),
                    expected_position=len(inputs),
                    options=types.PredictionOptions(top_k=5),
                ),
                metadata=route_metadata(session.session_id),
            )
            assert reply.position == len(inputs) + 1, session.session_id
            reference = ReferenceSession(store_root, "tok")
            reference.feed(inputs)
            assert_matches_reference(reply.prediction, reference.feed([5])[-1])


async def test_a_replica_killed_behind_nginx_loses_no_acknowledged_step(
    store_root: Path, tmp_path: Path, redis_server: RedisServer, replicas: list[ServerProcess]
) -> None:
    await asyncio.gather(*(r.start() for r in replicas))
    nginx = NginxServer(tmp_path / "nginx", [r.port for r in replicas])
    nginx.start()
    try:
        async with SeqServeClient(
            nginx.target, retry=RetryPolicy(deadline_seconds=60), multiplex=False
        ) as client:  # by Step, a random routing key per session: spread over the replicas
            load = _Load(client)
            await load.open()
            for _ in range(ROUNDS_BEFORE):
                await load.round()
            pids = [_holder_pid(redis_server.url, s.session_id) for s in load.sessions]
            by_replica = {r.proc.pid: pids.count(r.proc.pid) for r in replicas if r.proc}
            assert sum(by_replica.values()) == SESSIONS and all(by_replica.values()), by_replica
            victim = max(replicas, key=lambda r: by_replica[r.proc.pid if r.proc else 0])
            victim.kill()  # SIGKILL
            for _ in range(ROUNDS_AFTER):
                await load.round()
            assert all(len(inputs) == ROUNDS_BEFORE + ROUNDS_AFTER for inputs in load.fed)
            await load.check(store_root)
            assert victim.proc is not None  # every session is held by a replica still alive
            holders = {_holder_pid(redis_server.url, s.session_id) for s in load.sessions}
            assert victim.proc.pid not in holders
    finally:
        nginx.stop()


async def test_a_frozen_replica_applies_nothing_once_its_session_is_taken_over(
    store_root: Path, redis_server: RedisServer, replicas: list[ServerProcess]
) -> None:
    first, second = replicas[0], replicas[1]
    await asyncio.gather(first.start(), second.start())
    assert first.proc is not None
    async with (
        SeqServeClient(f"127.0.0.1:{first.port}") as to_first,
        SeqServeClient(f"127.0.0.1:{second.port}") as to_second,
    ):
        session = await to_first.create_session("tok", seed=1)
        await session.feed(tokens=[1, 2])
        sid, route = session.session_id, route_metadata(session.session_id)
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            stale = asyncio.ensure_future(
                to_first.sessions.Step(
                    pb.StepRequest(session_id=sid, input=tokens(66), expected_position=2),
                    metadata=route,
                    timeout=60,
                )
            )
            await asyncio.sleep(0.3)  # the step waits in the frozen process's socket
            taken = await to_second.sessions.Step(
                pb.StepRequest(session_id=sid, input=tokens(3), expected_position=2),
                metadata=route,
            )
            assert taken.position == 3
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stale
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert _holder_pid(redis_server.url, sid) == second.proc.pid  # type: ignore[union-attr]
        after = await to_second.sessions.Step(
            pb.StepRequest(session_id=sid, input=tokens(4), expected_position=3), metadata=route
        )
    reference = ReferenceSession(store_root, "tok")
    reference.feed([1, 2, 3])
    assert after.position == 4
    assert_matches_reference(after.prediction, reference.feed([4])[-1])


async def test_a_rolling_restart_behind_nginx_under_load_loses_no_session(
    store_root: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """SIGTERM one replica at a time (each drains, writes its sessions, exits, and comes back on
    its port) while 64 sessions are fed through nginx."""
    replicas = _three_replicas(store_root, tmp_path, redis_server.url, fixed_ports=True)
    nginx: NginxServer | None = None
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        nginx = NginxServer(tmp_path / "nginx", [r.port for r in replicas])
        nginx.start()
        async with SeqServeClient(
            nginx.target, retry=RetryPolicy(deadline_seconds=60), multiplex=False
        ) as client:  # by Step, a random routing key per session: spread over the replicas
            load = _Load(client)
            await load.open()
            running = asyncio.create_task(load.run())
            for replica in replicas:
                before = load.rounds
                while load.rounds < before + 2:  # it serves some rounds first
                    await asyncio.sleep(0.05)
                assert await replica.terminate() == 0
                await replica.start()
                assert not running.done(), running
            before = load.rounds
            while load.rounds < before + 2:
                await asyncio.sleep(0.05)
            load.stop()
            await running
            await load.check(store_root)
            assert load.rounds >= 8
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.kill()


async def test_redis_killed_and_restarted_on_its_append_only_file_loses_nothing(
    store_root: Path, tmp_path: Path, redis_server: RedisServer, replicas: list[ServerProcess]
) -> None:
    """Steps that need the tier get UNAVAILABLE while it is down; the service recovers by
    itself once it is back, and no acknowledged step is lost."""
    await asyncio.gather(*(r.start() for r in replicas[:2]))
    targets = [f"127.0.0.1:{r.port}" for r in replicas[:2]]
    async with (
        SeqServeClient(
            targets[0], retry=RetryPolicy(deadline_seconds=60), multiplex=False
        ) as client,
        SeqServeClient(targets[1]) as other,
    ):
        load = _Load(client)
        await load.open()
        running = asyncio.create_task(load.run())
        while load.rounds < 2:
            await asyncio.sleep(0.05)
        redis_server.kill()  # SIGKILL
        session = load.sessions[0]
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no retries on this channel
            await other.sessions.Step(
                pb.StepRequest(session_id=session.session_id, input=tokens(1)),
                metadata=route_metadata(session.session_id),
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "STATE_URL" in (err.value.details() or "")
        await asyncio.sleep(1.0)  # the load keeps retrying meanwhile
        redis_server.start()  # same port, same directory: it loads its append-only file
        before = load.rounds
        while load.rounds < before + 2:
            await asyncio.sleep(0.05)
        load.stop()
        await running
        await load.check(store_root)


async def test_multiplexed_feeds_through_nginx_survive_kill_freeze_and_restart(
    store_root: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """64 sessions on one multiplexing client (one routing key: one Stream, one replica), each
    fed one token per round concurrently through nginx (one Stream message per round), while
    the replica holding them is frozen (SIGSTOP) for a few stall periods (its silent Streams
    are replaced; once it wakes it gets both the feeds it had and their resends), then killed
    (SIGKILL) and restarted, then the holder restarted (SIGTERM, drain, start): no feed hangs
    on a dead or silent Stream, and every acknowledged feed is applied exactly once."""
    replicas = _three_replicas(store_root, tmp_path, redis_server.url, fixed_ports=True)
    nginx: NginxServer | None = None
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        nginx = NginxServer(tmp_path / "nginx", [r.port for r in replicas])
        nginx.start()
        retry = RetryPolicy(deadline_seconds=90)
        async with SeqServeClient(nginx.target, retry=retry, stall_seconds=1.0) as client:
            assert client.mux is not None
            load = _Load(client)
            await load.open()
            running = asyncio.create_task(load.run())

            async def rounds(n: int) -> None:
                before = load.rounds
                async with asyncio.timeout(120):  # a hung feed fails here, not the whole run
                    while load.rounds < before + n:
                        assert not running.done(), running
                        await asyncio.sleep(0.05)

            def holder() -> ServerProcess:
                pids = {_holder_pid(redis_server.url, s.session_id) for s in load.sessions}
                assert len(pids) == 1, pids  # one routing key: all on one replica
                return next(r for r in replicas if r.proc and r.proc.pid in pids)

            await rounds(2)
            frozen = holder()  # where nginx sends the key (no replica has failed yet)
            assert frozen.proc is not None
            opened = client.mux.streams_opened
            os.kill(frozen.proc.pid, signal.SIGSTOP)  # its Stream goes silent; nginx waits (1 h)
            try:
                await asyncio.sleep(4.5)
                # Each silent Stream was given up after its 1 s stall and the feeds resent on a
                # new one (also to the frozen replica: nginx has no reason to move the key).
                assert client.mux.streams_opened - opened >= 2
            finally:
                os.kill(frozen.proc.pid, signal.SIGCONT)  # it wakes with old and resent feeds
            await rounds(2)
            killed = holder()
            killed.kill()  # SIGKILL: the Stream through nginx dies with it
            await rounds(2)
            await killed.start()
            await rounds(1)
            drained = holder()
            assert await drained.terminate() == 0  # SIGTERM: drains, writes its sessions
            await drained.start()
            await rounds(2)
            load.stop()
            await running
            assert client.mux.streams_opened >= 3  # broken Streams were replaced
            assert all(len(inputs) == load.rounds for inputs in load.fed)
            await load.check(store_root)
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.kill()

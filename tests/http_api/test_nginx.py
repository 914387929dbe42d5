"""The HTTP API behind nginx running the deploy file: two real replicas on a real Redis state
tier. A session's calls reach the replica that made it (the routing key is in the URL), a
generation streams through, and when that replica is killed its session goes on through the
other one."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from benchmarks.real_services import NginxServer, RedisServer
from tests.api.test_lifecycle_restart import ServerProcess
from tests.api.test_replicas import _holder_pid, redis_server

from .conftest import sse_events

pytestmark = pytest.mark.integration
__all__ = ["redis_server"]  # a fixture, used by name


async def test_http_through_nginx_keeps_sessions_on_their_replica(
    store_root: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    extra = ("--state-url", redis_server.url, "--http-port", "0")
    replicas = [
        ServerProcess(store_root, tmp_path / f"s{i}", tmp_path / f"r{i}", 16, extra=extra)
        for i in range(2)
    ]
    nginx: NginxServer | None = None
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        nginx = NginxServer(
            tmp_path / "nginx",
            [r.port for r in replicas],
            http_ports=[r.http_port for r in replicas],
        )
        nginx.start()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{nginx.http_port}") as http:
            sids = []
            for i in range(16):
                made = await http.post(
                    "/v1/sessions", json={"model": "tok", "seed": str(i)},
                    headers={"x-seqserve-route": f"user{i}"},
                )  # fmt: skip
                assert made.status == 200, await made.text()
                sids.append((await made.json())["session"]["sessionId"])
            # The page's own calls (with its Origin) pass: nginx passes Host and the scheme.
            page = {"Origin": f"http://127.0.0.1:{nginx.http_port}"}
            assert (await http.get(f"/v1/sessions/{sids[0]}", headers=page)).status == 200
            makers = {sid: _holder_pid(redis_server.url, sid) for sid in sids}
            assert len(set(makers.values())) == 2  # the keys spread over both replicas
            for _ in range(3):  # steps by URL alone: no header
                for sid in sids:
                    step = await http.post(
                        f"/v1/sessions/{sid}:step", json={"input": {"text": "a"}}
                    )
                    assert step.status == 200, await step.text()
            # No session moved: each is still held by the replica that made it.
            assert {sid: _holder_pid(redis_server.url, sid) for sid in sids} == makers

            generated = await http.post(
                f"/v1/sessions/{sids[0]}:generate", json={"sampling": {"maxTokens": 5}}
            )
            events = sse_events(await generated.text())
            assert [e for e, _ in events] == ["token"] * 5 + ["done"]

            victim = sids[1]
            pid = makers[victim]
            os.kill(pid, signal.SIGKILL)
            step = await http.post(
                f"/v1/sessions/{victim}:step",
                json={"input": {"text": "b"}, "expectedPosition": "3", "requestId": "after-kill"},
            )
            assert step.status == 200, await step.text()
            assert (await step.json())["position"] == "4"  # nothing lost, nothing twice
            assert _holder_pid(redis_server.url, victim) != pid
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.kill()

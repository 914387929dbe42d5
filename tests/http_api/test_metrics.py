"""HTTP calls are timed in gRPC's family, `seqserve_rpc_duration_seconds`, as the methods they
call with `protocol="http"`; the exposition stays `promtool check metrics` clean."""

from __future__ import annotations

import shutil
import subprocess

import aiohttp
import pytest

from service.api.server import SeqServeServer


async def test_http_calls_are_counted_by_method_code_and_protocol(
    http_server: SeqServeServer, http: aiohttp.ClientSession
) -> None:
    made = await (await http.post("/v1/sessions", json={"model": "tok"})).json()
    sid = made["session"]["sessionId"]
    for _ in range(3):
        await http.post(f"/v1/sessions/{sid}:step", json={"input": {"text": "a"}})
    await http.get("/v1/sessions/s_nobody")
    await http.get("/v1/models")
    text = http_server.metrics.render().decode()

    def count(method: str, code: str) -> float:
        key = (f'seqserve_rpc_duration_seconds_count{{code="{code}",method="{method}",'
               'protocol="http"}')  # fmt: skip
        lines = [line for line in text.splitlines() if line.startswith(key)]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert count("Step", "OK") == 3
    assert count("CreateSession", "OK") == 1
    assert count("GetSession", "NOT_FOUND") == 1
    assert count("ListModels", "OK") == 1
    assert 'protocol="grpc"' not in text  # no gRPC call was made
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run `make system-deps`")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr

"""A Node.js client built from the .proto files alone (tests/node/client.js, @grpc/grpc-js and
@grpc/proto-loader) talks to the server and gets what the Python client gets.

Needs `node` and `npm` on PATH (the test fails, never skips, without them). tests/node's packages
are installed from its package-lock.json by `npm ci` when node_modules is missing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.security.tokens import add_token

from .certs import Certs
from .conftest import ServerFactory

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NPM_CI_TIMEOUT_S = 300
CLIENT_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    """The command that runs the Node client, with its packages installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node is not None, "node is not on PATH: install Node.js 18+ (Debian: nodejs, npm)"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        assert npm is not None, "npm is not on PATH, and tests/node/node_modules is missing"
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return [node, str(NODE_DIR / "client.js")]


async def _run_node(command: list[str], *args: str) -> dict[str, Any]:
    # Async: the server runs on this test's event loop, so a blocking wait would stall it.
    proc = await asyncio.create_subprocess_exec(
        *command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"node client exited {proc.returncode}:\n{err.decode()}"
    return json.loads(out.decode())


async def _python_run(
    client: SeqServeClient, text: str, seed: int, max_tokens: int, temperature: float, top_k: int
) -> tuple[pb.StepResponse, list[pb.GenerateResponse]]:
    created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", seed=seed))
    sid = created.session.session_id
    step = await client.sessions.Step(
        pb.StepRequest(
            session_id=sid,
            input=types.Input(text=text),
            options=types.PredictionOptions(top_k=top_k),
        )
    )
    request = pb.GenerateRequest(
        session_id=sid, sampling=make_sampling(temperature=temperature, max_tokens=max_tokens)
    )
    return step, [r async for r in client.sessions.Generate(request)]


@pytest.mark.parametrize(
    ("text", "seed", "max_tokens", "temperature", "top_k"),
    [("hello", 7, 6, 1.0, 5), ("héllo, wörld ✓", 123, 9, 0.0, 3)],
)
async def test_node_client_matches_python_client(
    node_client: list[str],
    server: SeqServeServer,
    client: SeqServeClient,
    text: str,
    seed: int,
    max_tokens: int,
    temperature: float,
    top_k: int,
) -> None:
    got = await _run_node(
        node_client,
        f"127.0.0.1:{server.port}",
        "--model=tok",
        f"--text={text}",
        f"--seed={seed}",
        f"--max-tokens={max_tokens}",
        f"--temperature={temperature}",
        f"--top-k={top_k}",
    )
    step, generated = await _python_run(client, text, seed, max_tokens, temperature, top_k)

    assert got["model"] == "tok" and got["version"] == 1 and got["seed"] == str(seed)
    assert got["session_id"].startswith("s_node-client.")  # its --route, via the metadata
    assert len(got["fingerprint"]) >= 16
    assert got["step"]["request_id"] == "node-1"
    assert got["step"]["position"] == step.position == len(text.encode())
    assert [t["id"] for t in got["step"]["top"]] == [t.id for t in step.prediction.tokens.top]
    assert [t["text"] for t in got["step"]["top"]] == [t.text for t in step.prediction.tokens.top]
    np.testing.assert_allclose(
        [t["prob"] for t in got["step"]["top"]],
        [t.prob for t in step.prediction.tokens.top],
        rtol=0,
        atol=1e-6,
    )
    assert [g["id"] for g in got["generated"]] == [r.token.id for r in generated]
    assert [g["text"] for g in got["generated"]] == [r.token.text for r in generated]
    assert [g["position"] for g in got["generated"]] == [r.position for r in generated]
    assert [g["finish_reason"] for g in got["generated"]] == [
        types.FinishReason.Name(r.token.finish_reason) for r in generated
    ]
    assert got["generated"][-1]["finish_reason"] == "FINISH_REASON_MAX_TOKENS"
    assert got["missing"] == {"code": 5, "name": "NOT_FOUND"}
    assert got["closed_state"] == "SESSION_STATE_CLOSED"


async def test_node_client_over_tls_with_a_token(
    node_client: list[str], server_factory: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    token = add_token(tokens, "node-app", "client")
    server = await server_factory(
        security={
            "tls_cert": certs.files["server.pem"],
            "tls_key": certs.files["server.key"],
            "auth_tokens": tokens,
        }
    )
    ca = str(certs.files["ca.pem"])
    got = await _run_node(
        node_client, f"localhost:{server.port}", "--model=tok", f"--ca={ca}", f"--token={token}"
    )
    assert got["step"]["position"] == len(b"hello")
    assert got["closed_state"] == "SESSION_STATE_CLOSED"
    proc = await asyncio.create_subprocess_exec(
        *node_client, f"localhost:{server.port}", "--model=tok", f"--ca={ca}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT_S)
    assert proc.returncode != 0 and b"UNAUTHENTICATED" in err.upper()

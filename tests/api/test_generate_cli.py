"""`seqserve generate` against a live server, as a shell user runs it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.polling import until

from .conftest import ServerFactory

REPO_ROOT = Path(__file__).resolve().parents[2]


async def test_generate_piped_into_head_exits_quietly_and_closes_its_session(
    server_factory: ServerFactory,
) -> None:
    """`seqserve generate … | head` used to end with "error: ABORTED": the session was closed
    while the abandoned generation still held it."""
    server = await server_factory()
    command = (
        f"{sys.executable} -m service.cli.main generate --target 127.0.0.1:{server.port} "
        "--model tok --prompt hi --max-tokens 2000 --seed 1 | head -c 5; "
        'echo "generate exited ${PIPESTATUS[0]}" >&2'
    )
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(shell.communicate(), 120)
    assert len(out) == 5 and out.startswith(b"hi")
    assert err.decode().strip().splitlines() == ["generate exited 0"]
    await until(  # the close is the command's last call; the server may still be on it
        lambda: len(server.engine.sessions) == 0, 60, "the session's close", interval=0.05
    )

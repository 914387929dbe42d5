"""A request aiohttp cannot parse (an over-long `Authorization` header) over a real socket: it is
refused, and the server's log gets one line that quotes nothing of what the client sent."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from service.security.tokens import add_token
from tests.api.conftest import ServerFactory

OVER_LIMIT = 9000  # aiohttp's limit on a header line is 8190 bytes


async def test_an_over_long_authorization_header_puts_no_token_in_the_log(
    server_factory: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    token = add_token(path, "alice", "client")
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    url = f"http://127.0.0.1:{server.http_port}/v1/models"
    header = f"Bearer {token} {'x' * OVER_LIMIT}"
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers={"Authorization": header}) as answer:
                assert answer.status == 400
                await answer.read()
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as answer:
                assert answer.status == 200  # the server goes on
    assert token[4:12] not in caplog.text  # not even the start of its random part
    refused = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert len(refused) == 1, [r.getMessage() for r in refused]
    assert refused[0].levelno == logging.WARNING
    assert refused[0].exc_info is None  # no traceback
    assert "LineTooLong" in refused[0].getMessage()

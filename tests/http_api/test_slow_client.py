"""A generation's `done` event whose write waits for a slow client: a shutdown's grace period
running out then leaves it to finish (`Routes.end_streams` ends only generations still
generating), and the body ends with `done`, no `error` after the last token.

aiohttp's writer waits for its transport only at the write that takes its count of bytes since
the last wait past 64 KiB (`StreamWriter.write`'s LIMIT), so the `done` write waits only where
the events before it leave it to cross that line. A twin session with the same seed generates
the same tokens: its bytes (read as they come) tell which `maxTokens` puts the line at `done`,
and the slow call's own bytes show afterwards that it was there."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp

from service.api.server import SeqServeServer
from tests.api.conftest import ServerFactory
from tests.polling import until

from .conftest import sse_events

LIMIT = 0x10000  # aiohttp's StreamWriter waits once this many bytes were written since the last
WINDOW = 4096  # the slow connection's kernel buffers, each way


class RawCall:
    """One HTTP/1.1 request over a plain socket, its chunked answer read chunk by chunk, so the
    sizes of the server's writes show: one write per chunk, the first with the headers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, slow: bool) -> RawCall:
        sock = socket.socket()
        if slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WINDOW)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        return cls(reader, writer)

    def send(self, sid: str, body: dict[str, Any]) -> None:
        data = json.dumps(body)
        self.writer.write(
            f"POST /v1/sessions/{sid}:generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n{data}".encode()
        )

    async def answer(self) -> tuple[list[int], str]:
        """The sizes of the server's body writes (the first with its headers; the last chunk,
        the body's end, left out), and the body's text."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        writes, text = [], []
        while True:
            line = await self.reader.readuntil(b"\r\n")
            size = int(line, 16)
            chunk = await self.reader.readexactly(size + 2)
            if not size:
                break
            writes.append(len(line) + len(chunk))
            text.append(chunk[:-2].decode())
        self.writer.close()
        writes[0] += len(head)
        return writes, "".join(text)


def waits_at(writes: list[int]) -> list[int]:
    """The indices of the writes aiohttp's writer waits at (its count of bytes written since
    the last wait passes LIMIT: then it waits for the transport and counts from 0)."""
    count, waits = 0, []
    for index, size in enumerate(writes):
        count += size
        if count > LIMIT:
            waits.append(index)
            count = 0
    return waits


async def _create(http: aiohttp.ClientSession, seed: int) -> str:
    response = await http.post("/v1/sessions", json={"model": "tok", "seed": str(seed)})
    return (await response.json())["session"]["sessionId"]


def _body(tokens: int) -> dict[str, Any]:
    return {"prompt": {"text": "a"}, "sampling": {"maxTokens": tokens, "temperature": 1.0}}


async def _writes(
    server: SeqServeServer, http: aiohttp.ClientSession, seed: int, n: int
) -> list[int]:
    call = await RawCall.open(server.http_port, slow=False)
    call.send(await _create(http, seed), _body(n))
    return (await call.answer())[0]


async def _done_waits_second(
    server: SeqServeServer, http: aiohttp.ClientSession
) -> tuple[int, int]:
    """A seed and `maxTokens` whose `done` is the second write the writer waits at (the first,
    at about 64 KiB, finds the transport still taking bytes; the second, at about 128 KiB,
    finds it paused: a client reading nothing holds it there)."""
    for seed in range(1, 20):
        tokens = (await _writes(server, http, seed, 1200))[:-1]  # the twin's token events
        for n in range(700, 1200):
            # The last token's event may differ (its finish reason, its text's flush): a guess,
            # checked by a run of exactly `n` tokens.
            waits = waits_at([*tokens[:n], 130])  # `done` is some 130 bytes
            exact = len(waits) == 2 and waits[1] == n
            if exact and waits_at(await _writes(server, http, seed, n)) == waits:
                return seed, n
    raise AssertionError("no seed and maxTokens put the writer's second wait at `done`")


async def _connection(server: SeqServeServer, client: tuple[str, int]) -> Any:
    """The server's end of the connection from `client` (its aiohttp handler) once accepted."""
    runner = server.parts.http._runner

    def accepted() -> Any:
        connections = runner.server.connections
        return next(
            (h for h in connections if h.transport.get_extra_info("peername") == client), None
        )

    return await until(accepted, 10, f"an HTTP connection from {client}")


async def test_a_done_write_held_up_by_its_client_is_left_to_finish_by_a_shutdown(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(server={"http_port": 0, "grace_seconds": 1.0})
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        seed, n = await _done_waits_second(server, http)
        sid = await _create(http, seed)
        call = await RawCall.open(server.http_port, slow=True)
        handler = await _connection(server, call.writer.get_extra_info("sockname"))
        sock = handler.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WINDOW)  # a slow network
        call.send(sid, _body(n))  # and nothing read: the writes wait once the buffers fill
        # Every token generated (the session is free, at its last position) and the answer
        # still unsent: the handler waits in a write after the last token's.
        deadline = time.monotonic() + 30
        while True:
            got = await (await http.get(f"/v1/sessions/{sid}")).json()
            if got["session"]["position"] == str(1 + n) and handler.writing_paused:
                break
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.05)

        routes = server.parts.http._routes
        ended = asyncio.Event()
        end_streams = routes.end_streams

        def ending() -> None:
            end_streams()
            ended.set()

        routes.end_streams = ending
        stopping = asyncio.create_task(server.stop())  # as SIGTERM does
        await asyncio.wait_for(ended.wait(), 30)  # the grace period is over
        writes, text = await asyncio.wait_for(call.answer(), 30)  # the client reads again
        await stopping
    events = sse_events(text)
    assert [event for event, _ in events] == ["token"] * n + ["done"], events[-3:]
    assert events[-1][1]["position"] == str(1 + n)
    assert waits_at(writes) == [waits_at(writes)[0], n]  # `done` (write n) was the one waiting

"""The client never sends a bearer token in plain text to a host that is not loopback: an
explicit token is refused when the client is made, the implicit SEQSERVE_TOKEN is left off
(with a warning); `insecure=True` opts in. `tls=True` uses TLS with the default roots. Against
a real gRPC server (loopback, this machine's non-loopback address, and a TLS one) that records
the `authorization` header of each call it receives."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from service.client.client import SeqServeClient
from service.client.credentials import Credentials, PlaintextToken
from service.client.target_address import is_loopback_target
from tests.api.certs import Certs, make_certs

REPO = Path(__file__).resolve().parents[2]
METHOD = "/test.Recorder/Call"


class Recorder:
    """A gRPC server on `host` with one method that records the authorization header."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.server = grpc.aio.server()

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            headers = dict(context.invocation_metadata() or ())
            self.seen.append(headers.get("authorization"))
            return b"ok"

        handler = grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=None, response_serializer=None
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Recorder", {"Call": handler}),)
        )


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, int]]:
    rec = Recorder()
    port = rec.server.add_insecure_port("0.0.0.0:0")  # loopback and the machine's address
    await rec.server.start()
    try:
        yield rec, port
    finally:
        await rec.server.stop(None)


def _outward_address() -> str:
    """A name or address of this machine that is not a loopback one to the client: its
    non-loopback IPv4 address (a UDP connect sends nothing), else its host name (the client
    judges by the name, even where /etc/hosts maps it to 127.0.x.x, as Debian's does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if address and not address.startswith("127."):
        return address
    name = socket.gethostname()
    socket.gethostbyname(name)  # it must resolve (to any address the 0.0.0.0 server hears)
    assert not is_loopback_target(f"{name}:1"), name
    return name


async def _call(creds: Credentials, target: str) -> None:
    channel = creds.channel(target)
    try:
        assert await channel.unary_unary(METHOD)(b"", timeout=10) == b"ok"
    finally:
        await channel.close()


async def test_an_explicit_token_in_plain_text_to_another_host_is_refused() -> None:
    with pytest.raises(PlaintextToken) as info:
        SeqServeClient("seqserve.example.com:50051", credentials=Credentials(token="sqs_secret"))
    message = str(info.value)
    assert "plain text to seqserve.example.com" in message and "tls=True" in message
    assert "sqs_secret" not in message
    # TLS, or the explicit opt-in, and the client is made (nothing connects yet).
    for ok in (Credentials(token="t", tls=True), Credentials(token="t", insecure=True)):
        async with SeqServeClient("seqserve.example.com:50051", credentials=ok):
            pass


async def test_tokens_reach_loopback_but_not_another_host_in_plain_text(
    recorder: tuple[Recorder, int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec, port = recorder
    outward = f"{_outward_address()}:{port}"
    monkeypatch.setenv("SEQSERVE_TOKEN", "sqs_from_env")
    await _call(Credentials(token="sqs_given"), f"127.0.0.1:{port}")
    await _call(Credentials(), f"localhost:{port}")  # the implicit token, to loopback
    with caplog.at_level(logging.WARNING, logger="service.client.credentials"):
        await _call(Credentials(), outward)  # the implicit token is kept back
    await _call(Credentials(insecure=True), outward)  # unless the caller says so
    await _call(Credentials(token="sqs_given", insecure=True), outward)
    with pytest.raises(PlaintextToken):
        await _call(Credentials(token="sqs_given"), outward)
    assert rec.seen == [
        "Bearer sqs_given", "Bearer sqs_from_env", None, "Bearer sqs_from_env", "Bearer sqs_given",
    ]  # fmt: skip
    (warning,) = [r.getMessage() for r in caplog.records if "SEQSERVE_TOKEN" in r.getMessage()]
    assert f"plain text to {outward.rsplit(':', 1)[0]}" in warning
    assert "sqs_from_env" not in warning


_TLS_CLIENT = """
import asyncio, sys
from service.client.credentials import Credentials

async def main() -> None:
    channel = Credentials(token="sqs_tls", tls=True).channel(sys.argv[1])
    print((await channel.unary_unary("/test.Recorder/Call")(b"", timeout=10)).decode())
    await channel.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_tls_true_uses_tls_with_the_default_roots(certs: Certs) -> None:
    """The default roots are the system's; gRPC reads them from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH
    when it is set, so a client process given the test CA there trusts the test server."""
    rec = Recorder()
    creds = grpc.ssl_server_credentials([(certs.server.key, certs.server.cert)])
    port = rec.server.add_secure_port("127.0.0.1:0", creds)
    await rec.server.start()
    try:
        env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(certs.files["ca.pem"])}
        env.pop("SEQSERVE_TOKEN", None)
        argv = [sys.executable, "-c", _TLS_CLIENT, f"localhost:{port}"]
        trusted = await _run(argv, env)
        assert trusted.returncode == 0 and trusted.stdout.strip() == "ok", trusted.stderr
        env.pop("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")  # the system's roots: the test CA is not one
        untrusted = await _run(argv, env)
        assert untrusted.returncode != 0 and "UNAVAILABLE" in untrusted.stderr
    finally:
        await rec.server.stop(None)
    assert rec.seen == ["Bearer sqs_tls"]


async def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import asyncio

    return await asyncio.to_thread(
        subprocess.run, argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_cli_flags_and_a_refused_token() -> None:
    from service.cli.main import build_parser
    from service.client.credentials import from_args

    parser = build_parser()
    for command in (["generate", "--model", "m", "--prompt", "p"], ["loadtest", "--model", "m"]):
        args = parser.parse_args([*command, "--tls", "--token", "t"])
        assert from_args(args) == Credentials(token="t", tls=True)
        args = parser.parse_args([*command, "--insecure"])
        assert from_args(args) == Credentials(insecure=True)
    env = {k: v for k, v in os.environ.items() if k != "SEQSERVE_TOKEN"}
    for command in (["generate", "--prompt", "p"], ["loadtest", "--duration", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "service.cli.main", *command, "--model", "m",
             "--target", "10.0.0.7:50051", "--token", "sqs_secret"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            "error: a token would travel in plain text to 10.0.0.7: use TLS (tls=True or a CA "
            "file; --tls or --tls-ca), or say the network is private (insecure=True; --insecure)"
        ], done.stderr

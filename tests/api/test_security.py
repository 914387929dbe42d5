"""Security over real gRPC: tokens with roles, sessions bound to their owner, TLS and mutual TLS
with certificates made here (the `cryptography` package), the start-up refusal, long ids."""

from __future__ import annotations

import asyncio
import errno
import http.client
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from multidict import CIMultiDict

from benchmarks.real_services import NGINX_CONF, NginxServer
from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.client.credentials import Credentials
from service.errors import InsecureBind, InvalidArgument
from service.loadtest import LoadConfig, run_load
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.security.tokens import TokenFile, add_token
from service.sessions import spill_record, spill_tier
from tests.polling import until

from .certs import Certs, Pem
from .conftest import TOKEN_CONFIG, ServerFactory, make_settings
from .support import item, tokens
from .test_lifecycle_restart import REPO_ROOT

NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _tls_channel(target: str, certs: Certs, client: Pem | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs.ca,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.aio.secure_channel(target, creds)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()


# ---- tokens and roles ------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens"
    made = {
        "alice": add_token(path, "alice", "client"),
        "bob": add_token(path, "bob", "client"),
        "root": add_token(path, "root", "admin"),
    }
    return path, made


async def test_tokens_authenticate_and_roles_gate_registry_writes(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]]
) -> None:
    path, tok = token_file
    assert "alice" not in path.read_text().split("\n")[0].split()[2]  # only hashes stored
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        sessions = pb_grpc.SessionServiceStub(channel)
        registry = reg_grpc.ModelRegistryStub(channel)
        create = pb.CreateSessionRequest(model="tok")
        assert await _code(sessions.CreateSession(create)) == grpc.StatusCode.UNAUTHENTICATED
        wrong = sessions.CreateSession(create, metadata=_bearer("not-a-token"))
        assert await _code(wrong) == grpc.StatusCode.UNAUTHENTICATED
        basic = sessions.CreateSession(create, metadata=(("authorization", "Basic eA=="),))
        assert await _code(basic) == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token

        made = await sessions.CreateSession(create, metadata=_bearer(tok["alice"]))
        assert made.session.session_id
        alias = reg_pb.SetAliasRequest(name="tok", alias="canary", version=1)
        denied = registry.SetAlias(alias, metadata=_bearer(tok["alice"]))
        assert await _code(denied) == grpc.StatusCode.PERMISSION_DENIED
        await registry.SetAlias(alias, metadata=_bearer(tok["root"]))
        listed = await registry.ListModels(
            reg_pb.ListModelsRequest(), metadata=_bearer(tok["alice"])
        )
        assert listed.models

        revoked = path.read_text().replace(
            next(line for line in path.read_text().splitlines() if line.startswith("bob ")), ""
        )
        path.write_text(revoked + "# bob's token revoked\n")  # re-read within a second
        for _ in range(600):  # a loaded host may be late by seconds
            try:
                await sessions.CreateSession(create, metadata=_bearer(tok["bob"]))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("a revoked token still works")


async def test_a_session_is_its_owners_alone(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]]
) -> None:
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        alice, bob = _bearer(tok["alice"]), _bearer(tok["bob"])
        made = await stub.CreateSession(pb.CreateSessionRequest(model="tok"), metadata=alice)
        sid = made.session.session_id
        await stub.Step(pb.StepRequest(session_id=sid, input=tokens(1, 2)), metadata=alice)
        child = await stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=alice)

        probes = {
            "GetSession": stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bob),
            "Step": stub.Step(pb.StepRequest(session_id=sid, input=tokens(3)), metadata=bob),
            "ForkSession": stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=bob),
            "CloseSession": stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=bob),
            "child": stub.GetSession(
                pb.GetSessionRequest(session_id=child.session.session_id), metadata=bob
            ),
        }
        unknown = "s_nobody.nothing"
        for name, call in probes.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == NOT_FOUND, name
            # Word for word what an id that never existed gets: no hint it does.
            assert (err.value.details() or "").replace(sid, unknown).replace(
                child.session.session_id, unknown
            ) == f"session {unknown!r} not found"
        generate = stub.Generate(pb.GenerateRequest(session_id=sid), metadata=bob)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in generate:
                pass
        assert err.value.code() == NOT_FOUND
        call = stub.Stream(metadata=bob)
        await call.write(pb.StreamRequest(items=[item(sid, "r", tokens(4))]))
        (reply,) = (await call.read()).replies
        assert reply.error.code == NOT_FOUND.value[0]
        await call.done_writing()

        got = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=alice)
        assert got.session.position == 2  # bob changed nothing
        closed = pb.CloseSessionRequest(session_id=sid)
        await stub.CloseSession(closed, metadata=alice)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # bob is not told it was closed
            await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bob)
        assert err.value.code() == NOT_FOUND


async def test_long_ids_are_not_echoed(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetSession(pb.GetSessionRequest(session_id="s_" + "x" * 100_000))
        assert err.value.code() == NOT_FOUND
        assert len(err.value.details() or "") < 200


# ---- TLS -------------------------------------------------------------------------------------


async def test_tls_and_mutual_tls(
    server_factory: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    tls = {"tls_cert": certs.files["server.pem"], "tls_key": certs.files["server.key"]}
    server = await server_factory(security=tls)
    target = f"localhost:{server.port}"
    async with grpc.aio.insecure_channel(target) as plain:  # plain text to a TLS port
        check = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert await _code(check) == grpc.StatusCode.UNAVAILABLE
    async with _tls_channel(target, certs) as channel:
        made = await pb_grpc.SessionServiceStub(channel).CreateSession(
            pb.CreateSessionRequest(model="tok")
        )
        assert made.session.session_id

    ca = tmp_path / "client-ca.pem"
    ca.write_bytes(certs.ca)
    mutual = await server_factory(security={**tls, "tls_client_ca": ca})
    target = f"localhost:{mutual.port}"
    async with _tls_channel(target, certs) as no_cert:
        call = pb_grpc.SessionServiceStub(no_cert).CreateSession(
            pb.CreateSessionRequest(model="tok"), timeout=5
        )
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    async with _tls_channel(target, certs, certs.stranger) as stranger:
        call = pb_grpc.SessionServiceStub(stranger).CreateSession(
            pb.CreateSessionRequest(model="tok"), timeout=5
        )
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE  # another CA's certificate
    async with (
        _tls_channel(target, certs, certs.clients["alice"]) as alice,
        _tls_channel(target, certs, certs.clients["bob"]) as bob,
    ):
        made = await pb_grpc.SessionServiceStub(alice).CreateSession(
            pb.CreateSessionRequest(model="tok")
        )
        sid = made.session.session_id
        probe = pb_grpc.SessionServiceStub(bob).GetSession(pb.GetSessionRequest(session_id=sid))
        assert await _code(probe) == NOT_FOUND  # the certificate's name is the principal
        mine = await pb_grpc.SessionServiceStub(alice).GetSession(
            pb.GetSessionRequest(session_id=sid)
        )
        assert mine.session.session_id == sid


async def _mutual_tls_server(server_factory: ServerFactory, certs: Certs, tmp_path: Path) -> str:
    """A server asking for client certificates the test CA signed; its target."""
    ca = tmp_path / "client-ca.pem"
    ca.write_bytes(certs.ca)
    tls = {"tls_cert": certs.files["server.pem"], "tls_key": certs.files["server.key"]}
    server = await server_factory(security={**tls, "tls_client_ca": ca})
    return f"localhost:{server.port}"


async def test_a_certificate_whose_name_cannot_be_a_principal_is_unauthenticated(
    server_factory: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    """Signed by the trusted CA, so the handshake succeeds, but named "alice\\n": the call is
    UNAUTHENTICATED, and the name is not taken for alice's (`re.match` with `$` once let it
    through as the principal "cert:alice\\n")."""
    target = await _mutual_tls_server(server_factory, certs, tmp_path)
    async with (
        _tls_channel(target, certs, certs.clients["alice"]) as alice,
        _tls_channel(target, certs, certs.clients["alice\n"]) as odd,
    ):
        made = await pb_grpc.SessionServiceStub(alice).CreateSession(
            pb.CreateSessionRequest(model="tok")
        )
        call = pb_grpc.SessionServiceStub(odd).GetSession(
            pb.GetSessionRequest(session_id=made.session.session_id), timeout=5
        )
        assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_certificate_with_two_common_names_is_unauthenticated(
    server_factory: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    """CN=bob and CN=alice in one subject: which one is meant is not the server's to guess
    (nginx would read the other one first); one whose O holds "CN=alice" is bob's."""
    target = await _mutual_tls_server(server_factory, certs, tmp_path)
    async with (
        _tls_channel(target, certs, certs.clients["two-cns"]) as two,
        _tls_channel(target, certs, certs.clients["backslash"]) as escaped,
        _tls_channel(target, certs, certs.clients["o-poses"]) as posing,
        _tls_channel(target, certs, certs.clients["bob"]) as bob,
    ):
        create = pb.CreateSessionRequest(model="tok")
        for channel in (two, escaped):
            call = pb_grpc.SessionServiceStub(channel).CreateSession(create, timeout=5)
            assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED
        made = await pb_grpc.SessionServiceStub(posing).CreateSession(create, timeout=5)
        mine = await pb_grpc.SessionServiceStub(bob).GetSession(
            pb.GetSessionRequest(session_id=made.session.session_id)
        )
        assert mine.session.session_id == made.session.session_id  # cert:bob's


async def test_a_revoked_client_certificate_is_refused_and_its_open_stream_ended(
    server_factory: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    """A certificate the CA still vouches for, named in a `revoke cert:<CN>` line of the tokens
    file while its Stream is open: the Stream is ended UNAUTHENTICATED (idle, by the
    revocation watch), new calls are refused naming the revocation, another certificate goes
    on; the line removed, alice is back and her session with her."""
    ca = tmp_path / "client-ca.pem"
    ca.write_bytes(certs.ca)
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# certificates only\n")
    tls = {"tls_cert": certs.files["server.pem"], "tls_key": certs.files["server.key"]}
    server = await server_factory(security={**tls, "tls_client_ca": ca, "auth_tokens": tokens_file})
    target = f"localhost:{server.port}"
    async with (
        _tls_channel(target, certs, certs.clients["alice"]) as alice_channel,
        _tls_channel(target, certs, certs.clients["bob"]) as bob_channel,
    ):
        alice, bob = (pb_grpc.SessionServiceStub(c) for c in (alice_channel, bob_channel))
        create = pb.CreateSessionRequest(model="tok")
        sid = (await alice.CreateSession(create)).session.session_id
        stream = alice.Stream()
        await stream.write(pb.StreamRequest(items=[item(sid, "a1", tokens(1))]))
        assert not (await stream.read()).replies[0].HasField("error")

        tokens_file.write_text("# certificates only\nrevoke cert:alice\n")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), timeout=10)  # idle: the watch ends it
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refused = alice.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "cert:alice is revoked" in (err.value.details() or "")
        assert (await bob.CreateSession(create)).session.session_id  # bob's goes on

        tokens_file.write_text("# certificates only\n")
        await asyncio.sleep(1.1)  # the file is looked at once a second
        got = await alice.GetSession(pb.GetSessionRequest(session_id=sid))
        assert got.session.position == 1


async def test_a_credential_header_sent_twice_is_unauthenticated(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]]
) -> None:
    """Two `authorization` values, or a proxy's two `x-seqserve-client` values: gRPC would
    take the last and HTTP the first, and a proxy that adds its header after the client's
    would let the client choose; each is refused, over gRPC and over HTTP."""
    path, tok = token_file
    proxy_token = add_token(path, "nginx", "proxy")
    server = await server_factory(server={"http_port": 0}, security={"auth_tokens": path})
    twice = (*_bearer(tok["alice"]), *_bearer(tok["bob"]))
    named_twice = (*_bearer(proxy_token), ("x-seqserve-client", "bob"),
                   ("x-seqserve-client", "alice"))  # fmt: skip
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        create = pb.CreateSessionRequest(model="tok")
        for metadata in (twice, named_twice):
            assert await _code(stub.CreateSession(create, metadata=metadata)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        assert (await stub.CreateSession(create, metadata=_bearer(tok["alice"]))).session
    url = f"http://127.0.0.1:{server.http_port}/v1/sessions"
    async with aiohttp.ClientSession() as http:
        for metadata in (twice, named_twice):
            headers = CIMultiDict(metadata)
            answer = await http.post(url, json={"model": "tok"}, headers=headers)
            assert answer.status == 401, await answer.text()
            assert "more than once" in (await answer.json())["error"]["message"]


async def test_a_network_bind_without_tls_and_tokens_is_refused(
    store_root: Path, tmp_path: Path
) -> None:
    settings = make_settings(store_root, tmp_path, server={"host": "0.0.0.0"})
    with pytest.raises(InsecureBind) as err:
        await SeqServeServer(settings).listen()
    assert "--insecure" in err.value.message
    allowed = make_settings(
        store_root, tmp_path, server={"host": "0.0.0.0"}, security={"insecure": True}
    )
    server = SeqServeServer(allowed)
    await server.start()
    try:
        assert server.port > 0
    finally:
        await server.stop()


# ---- clients -----------------------------------------------------------------------------------


async def test_the_python_client_and_the_cli_speak_tls_with_a_token(
    server_factory: ServerFactory,
    certs: Certs,
    token_file: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, tok = token_file
    tls = {"tls_cert": certs.files["server.pem"], "tls_key": certs.files["server.key"]}
    server = await server_factory(security={**tls, "auth_tokens": path})
    target = f"localhost:{server.port}"
    creds = Credentials(token=tok["alice"], ca_file=certs.files["ca.pem"])
    async with SeqServeClient(target, credentials=creds) as client:
        session = await client.create_session("tok", seed=3)
        assert (await session.feed(tokens=[1, 2])).position == 2
        pieces = [p async for p in session.generate(max_tokens=3)]
        assert len(pieces) == 3
    monkeypatch.setenv("SEQSERVE_TOKEN", tok["bob"])  # the default: the token from the env
    async with SeqServeClient(
        target, credentials=Credentials(ca_file=certs.files["ca.pem"])
    ) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:  # bob's token, alice's session
            await (await client.attach(session.session_id)).refresh()
        assert err.value.code() == NOT_FOUND
    monkeypatch.delenv("SEQSERVE_TOKEN")
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli.main", "generate", "--target", target,
        "--model", "tok", "--prompt", "hi", "--max-tokens", "3", "--seed", "1",
        "--token", tok["alice"], "--tls-ca", str(certs.files["ca.pem"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    _out, errors = await asyncio.wait_for(cli.communicate(), 120)
    assert cli.returncode == 0, errors.decode()
    no_token = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli.main", "generate", "--target", target,
        "--model", "tok", "--prompt", "hi", "--tls-ca", str(certs.files["ca.pem"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    _, errors = await asyncio.wait_for(no_token.communicate(), 120)
    assert no_token.returncode != 0 and b"UNAUTHENTICATED" in errors


async def test_a_body_that_is_not_protobuf_is_invalid_argument_and_counted(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        garbage = b"\xff\xff\xff\xff\x0f not a message"
        step = channel.unary_unary("/seqserve.v1.SessionService/Step")
        assert await _code(step(garbage)) == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_stream("/seqserve.v1.SessionService/Stream")
        call = stream(iter([garbage]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = await pb_grpc.SessionServiceStub(channel).CreateSession(
            pb.CreateSessionRequest(model="tok")
        )
        assert ok.session.session_id  # the server is fine

    def counted() -> str | None:
        text = server.metrics.render().decode()
        return text if 'method="Stream"' in text else None

    # The Stream is counted as it ends, just after the client's last read.
    text = await until(counted, 60, "the Stream to be counted", interval=0.02)
    assert 'code="INVALID_ARGUMENT",method="Step"' in text
    assert 'code="INVALID_ARGUMENT",method="Stream"' in text


async def test_a_failed_eviction_tells_the_caller_nothing_of_the_evicted_session(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's request needs A's slot; writing A out fails (a read-only disk): B hears neither A's
    id nor a server path."""
    slot = 4 * TOKEN_CONFIG.state_numel()
    server = await server_factory(
        sessions={"pool_bytes": slot, "pool_initial_slots": 1, "slot_wait_seconds": 0}
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        a = (await stub.CreateSession(pb.CreateSessionRequest(model="tok"))).session.session_id

        def read_only(*_args: object) -> None:
            raise OSError(errno.EROFS, "Read-only file system", "/srv/state/" + a + ".spill")

        monkeypatch.setattr(spill_tier.os, "replace", read_only)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateSession(pb.CreateSessionRequest(model="tok"))
        details = err.value.details() or ""
        assert a not in details and "/srv" not in details, details
        assert str(server.settings.sessions.spill_dir) not in details


def _retry_delay(err: grpc.aio.AioRpcError) -> float:
    """The RetryInfo detail's delay, in seconds."""
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw is not None, "no status details"
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo detail")


async def test_quotas_hold_one_principal_without_touching_another(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]]
) -> None:
    path, tok = token_file
    server = await server_factory(
        security={"auth_tokens": path, "sessions_per_principal": 2, "tokens_per_second": 8}
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        alice, bob = _bearer(tok["alice"]), _bearer(tok["bob"])
        create = pb.CreateSessionRequest(model="tok")
        mine = [(await stub.CreateSession(create, metadata=alice)).session.session_id
                for _ in range(2)]  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateSession(create, metadata=alice)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "SESSIONS_PER_PRINCIPAL" in (err.value.details() or "")
        assert _retry_delay(err.value) > 0
        theirs = (await stub.CreateSession(create, metadata=bob)).session.session_id

        burst = pb.StepRequest(session_id=mine[0], input=tokens(*range(40)))
        await stub.Step(burst, metadata=alice)  # five seconds' worth, let through: a full bucket
        # Half a second's worth next: refused unless 4.5 s passed between the two, the burst's
        # step included (with only a second's worth first, 25 ms of refill let one token
        # through once on a loaded host).
        half = pb.StepRequest(session_id=mine[0], input=tokens(*range(4)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Step(half, metadata=alice)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        delay = _retry_delay(err.value)
        assert 0 < delay <= 4.6
        got = await stub.GetSession(pb.GetSessionRequest(session_id=mine[0]), metadata=alice)
        assert got.session.position == 40  # the refused step changed nothing
        other = pb.StepRequest(session_id=theirs, input=tokens(1))
        assert (await stub.Step(other, metadata=bob)).position == 1  # bob is not held back
        await asyncio.sleep(delay)
        again = pb.StepRequest(session_id=mine[0], input=tokens(1))
        assert (await stub.Step(again, metadata=alice)).position == 41
        await stub.CloseSession(pb.CloseSessionRequest(session_id=mine[1]), metadata=alice)
        assert (await stub.CreateSession(create, metadata=alice)).session.session_id


# ---- behind nginx ------------------------------------------------------------------------------


async def test_tokens_pass_through_nginx_and_client_certificates_are_verified_there(
    server_factory: ServerFactory,
    certs: Certs,
    token_file: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    """Plain nginx (deploy/nginx/seqserve.conf) passes bearer tokens through unchanged. With
    deploy/nginx/seqserve-mtls.conf nginx verifies client certificates and names the client to
    the replica with its own `proxy` token; the replica believes that header only from it."""
    path, tok = token_file
    proxy_token = add_token(path, "nginx", "proxy")
    replica = await server_factory(security={"auth_tokens": path})
    plain = NginxServer(tmp_path / "nginx", [replica.port])
    secrets_conf = tmp_path / "proxy-token.conf"
    secrets_conf.write_text(f'set $seqserve_proxy_token "{proxy_token}";\n')
    ca = tmp_path / "client-ca.pem"
    ca.write_bytes(certs.ca)
    mutual = NginxServer(
        tmp_path / "nginx-mtls",
        [replica.port],
        conf=NGINX_CONF.with_name("seqserve-mtls.conf"),
        paths={
            "/etc/nginx/tls/server.pem": certs.files["server.pem"],
            "/etc/nginx/tls/server.key": certs.files["server.key"],
            "/etc/nginx/tls/client-ca.pem": ca,
            "/etc/nginx/secrets/proxy-token.conf": secrets_conf,
        },
    )
    try:
        plain.start()
        mutual.start()  # (a config nginx refuses raises here: plain is stopped all the same)
        create = pb.CreateSessionRequest(model="tok")
        async with grpc.aio.insecure_channel(plain.target) as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            assert await _code(stub.CreateSession(create)) == grpc.StatusCode.UNAUTHENTICATED
            made = await stub.CreateSession(create, metadata=_bearer(tok["alice"]))
            probe = stub.GetSession(
                pb.GetSessionRequest(session_id=made.session.session_id),
                metadata=_bearer(tok["bob"]),
            )
            assert await _code(probe) == NOT_FOUND

        target = f"localhost:{mutual.port}"
        async with _tls_channel(target, certs) as no_cert:
            call = pb_grpc.SessionServiceStub(no_cert).CreateSession(create, timeout=5)
            assert await _code(call) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        async with (
            _tls_channel(target, certs, certs.clients["alice"]) as alice,
            _tls_channel(target, certs, certs.clients["bob"]) as bob,
        ):
            # A client cannot claim to be someone else: nginx replaces the header.
            forged = (("x-seqserve-client", "bob"),)
            mine = await pb_grpc.SessionServiceStub(alice).CreateSession(create, metadata=forged)
            sid = mine.session.session_id
            seen = pb_grpc.SessionServiceStub(bob).GetSession(pb.GetSessionRequest(session_id=sid))
            assert await _code(seen) == NOT_FOUND
            again = await pb_grpc.SessionServiceStub(alice).GetSession(
                pb.GetSessionRequest(session_id=sid)
            )
            assert again.session.session_id == sid
        async with _tls_channel(target, certs, certs.clients["carol"]) as channel:
            # emailAddress=…,CN=carol,O=Acme\, Inc: the CN is not first, and is carol's
            made = await pb_grpc.SessionServiceStub(channel).CreateSession(create, timeout=5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as direct:
            as_carol = (*_bearer(proxy_token), ("x-seqserve-client", "carol"))
            seen = await pb_grpc.SessionServiceStub(direct).GetSession(
                pb.GetSessionRequest(session_id=made.session.session_id), metadata=as_carol
            )
            assert seen.session.session_id == made.session.session_id  # cert:carol's
        for posing in ("two-cns", "o-poses", "backslash"):  # subjects also saying "CN=alice"
            async with _tls_channel(target, certs, certs.clients[posing]) as channel:
                probe = pb_grpc.SessionServiceStub(channel).GetSession(
                    pb.GetSessionRequest(session_id=sid), timeout=5
                )
                assert await _code(probe) == grpc.StatusCode.UNAUTHENTICATED, posing
        # Straight to the replica, the header counts for nothing without the proxy's token.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as direct:
            stub = pb_grpc.SessionServiceStub(direct)
            claim = (*_bearer(tok["bob"]), ("x-seqserve-client", "alice"))
            probe = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=claim)
            assert await _code(probe) == NOT_FOUND
            bare_proxy = stub.CreateSession(create, metadata=_bearer(proxy_token))
            assert await _code(bare_proxy) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        plain.stop()
        mutual.stop()


async def test_the_metrics_endpoint_serves_https(
    server_factory: ServerFactory, certs: Certs
) -> None:
    server = await server_factory(
        server={"metrics_port": 0},
        security={
            "tls_cert": certs.files["server.pem"],
            "tls_key": certs.files["server.key"],
            "metrics_tls": True,
        },
    )
    url = f"https://localhost:{server.metrics_port}/metrics"
    context = ssl.create_default_context(cafile=str(certs.files["ca.pem"]))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    body = await asyncio.to_thread(lambda: opener.open(url, timeout=10).read())
    assert b"seqserve_sessions" in body
    plain = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        await asyncio.to_thread(
            lambda: plain.open(f"http://localhost:{server.metrics_port}/metrics", timeout=10).read()
        )


async def test_only_the_owner_hears_that_a_damaged_session_is_lost(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Alice's session is written at shutdown, and its record damaged while the server is down:
    after the restart alice hears DATA_LOSS, bob the NOT_FOUND of an id that never existed."""
    path, tok = token_file
    state = tmp_path / "state"
    first = await server_factory(security={"auth_tokens": path}, sessions={"spill_dir": state})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        made = await stub.CreateSession(
            pb.CreateSessionRequest(model="tok"), metadata=_bearer(tok["alice"])
        )
        kept = await stub.CreateSession(
            pb.CreateSessionRequest(model="tok"), metadata=_bearer(tok["alice"])
        )
    sid = made.session.session_id
    await first.stop()
    (record,) = state.glob(f"{sid}*")
    data = bytearray(record.read_bytes())
    length_at = len(spill_record.MAGIC) + 2 + len(b"alice") + 4  # after the owner block
    data[length_at : length_at + 4] = b"\xff\xff\xff\xff"  # the header cannot be found
    record.write_bytes(bytes(data))
    second = await server_factory(security={"auth_tokens": path}, sessions={"spill_dir": state})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        get = pb.GetSessionRequest(session_id=sid)
        assert await _code(stub.GetSession(get, metadata=_bearer(tok["alice"]))) == (
            grpc.StatusCode.DATA_LOSS
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetSession(get, metadata=_bearer(tok["bob"]))
        assert err.value.code() == NOT_FOUND
        assert err.value.details() == f"session {sid!r} not found"
        intact = pb.GetSessionRequest(session_id=kept.session.session_id)  # spilled, restored
        assert (await stub.GetSession(intact, metadata=_bearer(tok["alice"]))).session.session_id
        assert await _code(stub.GetSession(intact, metadata=_bearer(tok["bob"]))) == NOT_FOUND


async def test_reflection_can_be_turned_off_and_the_load_generator_takes_a_token(
    server_factory: ServerFactory, token_file: tuple[Path, dict[str, str]]
) -> None:
    path, tok = token_file
    server = await server_factory(security={"auth_tokens": path, "reflection": False})
    target = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        # Nothing written: the server answers from the method's name alone, and a request
        # the client were still sending when that status came would fail on the client's
        # side first (INTERNAL "Internal error from Core": once, under load).
        call = reflect(metadata=_bearer(tok["alice"]))
        assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.UNIMPLEMENTED
    config = LoadConfig(target=target, model="tok", sessions=4, duration_seconds=0.5)
    report = await run_load(config, credentials=Credentials(token=tok["alice"]))
    assert report.tokens_per_second > 0 and not report.errors


async def test_long_names_are_not_echoed(server_factory: ServerFactory) -> None:
    server = await server_factory()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        registry = reg_grpc.ModelRegistryStub(channel)
        long = "m" * 100_000
        calls = {
            "model": stub.CreateSession(pb.CreateSessionRequest(model=long)),
            "alias": stub.CreateSession(pb.CreateSessionRequest(model="tok", version="a" * 9999)),
            "registry": registry.GetModel(reg_pb.GetModelRequest(name=long)),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert len(err.value.details() or "") < 400, name


def test_a_deleted_tokens_file_refuses_every_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = add_token(path, "alice", "client")
    tokens = TokenFile(path)
    assert tokens.authenticate(token) is not None
    path.unlink()
    tokens._checked = 0.0  # the next check looks at the file now
    assert tokens.authenticate(token) is None
    with pytest.raises(InvalidArgument):
        add_token(path, "cert:alice", "client")  # certificate names are not token names


def test_a_principal_with_a_line_break_is_refused_and_the_file_stays_readable(
    tmp_path: Path,
) -> None:
    # A name that ends in a newline passed `^...$` with `re.match`, and wrote a line of its own
    # into the tokens file: a file the server then refused whole.
    path = tmp_path / "tokens"
    token = add_token(path, "alice", "client")
    with pytest.raises(InvalidArgument, match="principal"):
        add_token(path, "mallory\n", "admin")
    assert len(path.read_text().splitlines()) == 1
    assert TokenFile(path).authenticate(token) is not None


async def test_sessions_made_with_auth_off_are_no_principals_once_it_is_on(
    store_root: Path, tmp_path: Path, token_file: tuple[Path, dict[str, str]]
) -> None:
    """A session made while auth was off has no owner. Restarted on the same state with tokens,
    every principal could read, feed and close it; now none sees it (NOT_FOUND, as an id that
    never existed), and a session made now is its maker's as ever."""
    path, tokens = token_file
    server = SeqServeServer(make_settings(store_root, tmp_path))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            made = await pb_grpc.SessionServiceStub(ch).CreateSession(
                pb.CreateSessionRequest(model="tok", prefix=types.Input(text="ab"))
            )
    finally:
        await server.stop()
    sid = made.session.session_id
    server = SeqServeServer(make_settings(store_root, tmp_path, security={"auth_tokens": path}))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            for name in tokens:
                auth = _bearer(tokens[name])
                calls = [
                    stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=auth),
                    stub.Step(
                        pb.StepRequest(session_id=sid, input=types.Input(text="c")), metadata=auth
                    ),
                    stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=auth),
                ]
                for call in calls:
                    assert await _code(call) == grpc.StatusCode.NOT_FOUND, name
            mine = await stub.CreateSession(
                pb.CreateSessionRequest(model="tok"), metadata=_bearer(tokens["alice"])
            )
            got = await stub.GetSession(
                pb.GetSessionRequest(session_id=mine.session.session_id),
                metadata=_bearer(tokens["alice"]),
            )
            assert got.session.session_id == mine.session.session_id
    finally:
        await server.stop()

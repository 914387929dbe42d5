"""`--client-mux` against a real in-process server: every session awaits its own feeds on one
multiplexing SeqServeClient, and the client coalesces them into Stream messages."""

from __future__ import annotations

import asyncio

import pytest

from service.api.server import SeqServeServer
from service.cli.loadtest_cmd import config_from_args
from service.cli.main import build_parser, main
from service.loadtest import LoadConfig, run_load
from tests.loadtest.test_load_generator import _ConnectionCounter, proxy  # noqa: F401 - fixture


def config(target: str, **overrides: object) -> LoadConfig:
    base: dict[str, object] = {"model": "tok", "sessions": 16, "duration_seconds": 1.0}
    return LoadConfig(target=target, client_mux=True, **{**base, **overrides})  # type: ignore[arg-type]


async def test_feeds_of_many_sessions_go_out_together(target: str, server: SeqServeServer) -> None:
    report = await run_load(config(target, top_k=3))

    assert report.errors == {}
    assert report.tokens_in > 0 and report.step_latency is not None
    # Sixteen closed loops on one client: each tick's feeds leave as one message, not sixteen.
    assert report.messages > 0 and report.items / report.messages >= 8, (
        report.items,
        report.messages,
    )
    assert list(server.engine.sessions) == []  # every session was closed afterwards


async def test_frames_history_and_invalid_sessions(target: str) -> None:
    report = await run_load(
        config(target, model="frames", sessions=3, history=5, tokens_per_message=2,
               invalid_sessions=1)
    )  # fmt: skip

    assert report.tokens_in > 0  # the valid sessions went on, frames two at a time
    assert report.tokens_in % 2 == 0
    assert set(report.errors) == {"NOT_FOUND"}
    assert report.errors_by_operation == {"feed": {"NOT_FOUND": report.errors["NOT_FOUND"]}}
    assert "loadtest-invalid-0" in report.error_examples["NOT_FOUND"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rate": 10.0}, "--client-mux is a closed loop"),
        ({"multiplex": 4}, "--client-mux groups feeds itself"),
        ({"generate_fraction": 0.5}, "--client-mux feeds only"),
    ],
)
def test_client_mux_config_is_validated(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config("127.0.0.1:1", **overrides).validate()


def test_the_flag_maps_onto_the_config() -> None:
    args = build_parser().parse_args(["loadtest", "--client-mux", "--sessions", "64"])
    assert config_from_args(args).client_mux
    args = build_parser().parse_args(["loadtest"])
    assert not config_from_args(args).client_mux


async def test_the_cli_reports_the_mode(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["loadtest", "--target", target, "--model", "tok", "--sessions", "8", "--duration",
            "0.5", "--client-mux", "--quiet"]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    assert "client-mux" in capsys.readouterr().out


async def test_proxy_settings_never_divert_the_clients_traffic(
    target: str,
    proxy: _ConnectionCounter,  # noqa: F811 - the fixture
) -> None:
    report = await run_load(config(target, sessions=2, duration_seconds=0.5))

    assert report.tokens_in > 0 and report.errors == {}
    assert proxy.connections == 0

"""`seqserve loadtest` end to end against an in-process server: the text report, --json and
--plot files, and exit codes. The CLI runs its own event loop, so it runs in a thread here."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from service.cli.loadtest_cmd import config_from_args
from service.cli.main import build_parser, main
from service.loadtest import LoadConfig
from tests.client.test_target_address import BAD_TARGETS, GOOD_TARGETS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, ["loadtest", *argv])


async def test_writes_report_json_and_plot(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path, plot_path = tmp_path / "r" / "report.json", tmp_path / "r" / "report.png"

    code = await run_cli(
        "--target", target, "--model", "tok", "--sessions", "3", "--duration", "1",
        "--generate-fraction", "0.3", "--max-tokens", "3", "--invalid-sessions", "1",
        "--json", str(report_path), "--plot", str(plot_path),
    )  # fmt: skip

    assert code == 0
    out = capsys.readouterr()
    assert "tokens/s" in out.out and "NOT_FOUND" in out.out
    assert "sessions 3" in out.err  # the progress line
    data = json.loads(report_path.read_text())
    assert data["rates"]["tokens_per_second"] > 0
    assert data["errors"]["NOT_FOUND"] > 0
    step = data["step_latency"]
    assert step["p50"] <= step["p90"] <= step["p99"] <= step["max"]
    assert plot_path.read_bytes()[:8] == PNG_SIGNATURE


async def test_json_to_stdout_keeps_stdout_parseable(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli(
        "--target", target, "--model", "tok", "--sessions", "1", "--duration", "0.5",
        "--json", "-", "--quiet",
    )  # fmt: skip

    assert code == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["sessions"] == 1
    assert "tokens/s" in out.err


async def test_unknown_model_exits_1(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_cli("--target", target, "--model", "nope", "--duration", "0.5", "--quiet")

    assert code == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["loadtest", "--sessions", "4", "--generate-fraction", "2", "--quiet"])

    assert code == 2
    assert "generate fraction" in capsys.readouterr().err


def test_flags_map_onto_the_config() -> None:
    args = build_parser().parse_args(
        ["loadtest", "--target", "seqserve:50051", "--sessions", "64", "--duration", "30",
         "--multiplex", "16", "--think-ms", "250", "--generate-fraction", "0.25",
         "--generate-via", "stream", "--max-tokens", "64", "--tokens-per-message", "4",
         "--history", "1000", "--warmup", "2", "--model", "m", "--version", "staging"]
    )  # fmt: skip

    cfg = config_from_args(args)

    assert (cfg.target, cfg.sessions, cfg.duration_seconds) == ("seqserve:50051", 64, 30.0)
    assert (cfg.multiplex, cfg.think_ms, cfg.generate_fraction) == (16, 250.0, 0.25)
    assert (cfg.generate_via, cfg.max_tokens, cfg.tokens_per_message) == ("stream", 64, 4)
    assert (cfg.history, cfg.warmup_seconds, cfg.model, cfg.version) == (1000, 2.0, "m", "staging")


async def test_open_loop_run_writes_its_fields_and_plot(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path, plot_path = tmp_path / "open.json", tmp_path / "open.png"

    code = await run_cli(
        "--target", target, "--model", "tok", "--sessions", "4", "--duration", "1",
        "--rate", "120", "--generate-fraction", "0.3", "--max-tokens", "3", "--late-ms", "5",
        "--max-lag", "0.5", "--json", str(report_path), "--plot", str(plot_path), "--quiet",
    )  # fmt: skip

    assert code == 0
    assert "requests/s asked" in capsys.readouterr().out
    data = json.loads(report_path.read_text())
    assert data["mode"] == "open" and data["config"]["rate"] == 120.0
    o = data["open_loop"]
    assert o["arrivals"] > 0 and o["sent"] + o["dropped"] == o["arrivals"]
    assert (o["late_ms"], o["max_lag_seconds"]) == (5.0, 0.5)
    assert o["send_lag"]["count"] == o["sent"]
    assert data["time_to_first_token"]["count"] > 0 and data["step_latency"]["count"] > 0
    assert {"ttft_p50", "ttft_p99", "dropped"} <= data["timeline"][0].keys()
    assert plot_path.read_bytes()[:8] == PNG_SIGNATURE


def test_open_loop_flags_map_onto_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["loadtest", "--rate", "250", "--late-ms", "2", "--max-lag", "0.5"]
    )
    cfg = config_from_args(args)

    assert (cfg.rate, cfg.late_ms, cfg.max_lag_seconds, cfg.open_loop) == (250.0, 2.0, 0.5, True)
    assert not config_from_args(build_parser().parse_args(["loadtest"])).open_loop
    assert main(["loadtest", "--rate", "10", "--think-ms", "5", "--quiet"]) == 2
    assert "--think-ms applies to the closed loop" in capsys.readouterr().err


def test_a_json_path_that_cannot_be_written_exits_2_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "report.json"  # its folder would be a file
    # No server at the target: the run would fail; the path is refused before it starts.
    code = main(["loadtest", "--target", "127.0.0.1:1", "--json", str(path), "--quiet"])

    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --json {path}: File exists"


def test_a_json_path_checked_writable_is_left_as_it_was(tmp_path: Path) -> None:
    from service.loadtest.report import check_writable

    path = tmp_path / "new" / "report.json"
    check_writable(path)
    assert path.parent.is_dir() and not path.exists()


@pytest.mark.parametrize("flag", ["--tls-ca", "--tls-cert", "--tls-key"])
def test_a_tls_file_that_does_not_exist_exits_2(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.pem"
    code = main(["loadtest", "--target", "127.0.0.1:1", flag, str(missing), "--quiet"])

    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {flag} {missing}: No such file or directory"


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_a_target_that_is_not_host_port_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match=r"^target must be host:port") as refused:
        LoadConfig(target=target).validate()
    assert repr(target) in str(refused.value)


@pytest.mark.parametrize("target", GOOD_TARGETS)
def test_host_port_and_grpc_target_uris_are_accepted(target: str) -> None:
    LoadConfig(target=target).validate()  # raises for a refused one


@pytest.mark.parametrize("target", ["", "127.0.0.1:99999", "127.0.0.1:0"])
def test_a_bad_target_exits_2_with_one_line_before_connecting(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["loadtest", "--target", target, "--ready-timeout", "1", "--quiet"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: target must be host:port") and repr(target) in err, err
    assert len(err.strip().splitlines()) == 1, err


# Every float a load test takes; inf was accepted by all but --rate (nan by none): an infinite
# duration or warmup never ends, an infinite ready timeout waits for ever for a target that does
# not answer, an infinite think time is one turn a session and then a pause till the end, and
# an inf anywhere makes the --json report's config `Infinity`, which is not JSON.
FLOAT_FIELDS = [
    ("duration_seconds", "duration must be > 0 and finite"),
    ("warmup_seconds", "warmup must be >= 0 and finite"),
    ("think_ms", "think time must be >= 0 and finite"),
    ("temperature", "temperature must be >= 0 and finite"),
    ("drain_seconds", "drain must be >= 0 and finite"),
    ("ready_timeout_seconds", "ready timeout must be >= 0 and finite"),
    ("late_ms", "late threshold must be >= 0 and finite"),
    ("max_lag_seconds", "max lag must be > 0 and finite"),
    ("rate", "rate must be >= 0 and <= 1,000,000"),
]


@pytest.mark.parametrize(("field", "message"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_float_that_is_not_finite_is_refused(field: str, message: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        LoadConfig(target="127.0.0.1:1", **{field: value}).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--duration", "duration must be > 0 and finite"),
        ("--warmup", "warmup must be >= 0 and finite"),
        ("--think-ms", "think time must be >= 0 and finite"),
        ("--temperature", "temperature must be >= 0 and finite"),
        ("--late-ms", "late threshold must be >= 0 and finite"),
        ("--max-lag", "max lag must be > 0 and finite"),
    ],
)
def test_an_infinite_flag_exits_2_before_the_run(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--duration inf` ran for ever (nan was refused). No server at the target: a run that was
    let start fails (exit 1) after --ready-timeout."""
    argv = ["loadtest", "--target", "127.0.0.1:1", "--ready-timeout", "1", "--quiet"]
    code = main([*argv, flag, "inf"])

    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize(
    "flags",
    [["--sessions", "-1"], ["--sessions", "0"], ["--sessions", "0", "--invalid-sessions", "2"]],
)
def test_sessions_below_one_are_refused_with_one_true_message(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """-1 said "sessions must be >= 0" and 0 "need at least one session" (0 with invalid
    sessions, which are extra sessions, ran them alone: a run that moves no tokens, exit 1)."""
    argv = ["loadtest", "--target", "127.0.0.1:1", "--ready-timeout", "1", "--quiet"]
    code = main([*argv, *flags])

    assert code == 2
    assert capsys.readouterr().err.strip() == "error: sessions must be >= 1"
    with pytest.raises(ValueError, match=r"^sessions must be >= 1$"):
        config_from_args(build_parser().parse_args([*argv, *flags])).validate()

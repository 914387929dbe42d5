"""`seqserve generate`: argument errors (one line and exit 2, before any call), an unreachable
target within `--timeout`, and a generation against a real server."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.api.server import SeqServeServer
from service.cli import generate_cmd
from service.cli.main import build_parser, main
from tests.api.conftest import server, server_factory, store_root  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flag", ["--tls-ca", "--tls-cert", "--tls-key"])
def test_a_tls_file_that_cannot_be_read_exits_2(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.pem"
    argv = ["generate", "--target", "127.0.0.1:1", "--model", "m", "--prompt", "hi"]
    code = main([*argv, flag, str(missing)])

    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {flag} {missing}: No such file or directory"
    assert "Traceback" not in err
    code = main([*argv, flag, str(tmp_path)])  # a folder
    assert code == 2 and f"{flag} {tmp_path}: Is a directory" in capsys.readouterr().err


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path: Path) -> None:
    """SIGINT while `generate` waits for a server that is not there (it retries UNAVAILABLE
    for its retry deadline): one line, 130, no traceback."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "service.cli.main", "generate", "--target",
               f"127.0.0.1:{port}", "--model", "m", "--prompt", "hi"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(5.0)  # past start-up (imports: seconds on a loaded machine), into the retries
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert err.strip() == "seqserve: interrupted"


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999"])
def test_a_number_out_of_its_field_s_range_is_one_line_not_a_traceback(
    seed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by the client before any call (nothing listens on the target)."""
    argv = ["generate", "--target", "127.0.0.1:1", "--model", "m", "--prompt", "hi"]
    code = main([*argv, "--seed", seed])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert err.strip().startswith("error: INVALID_ARGUMENT: Value out of range"), err
    assert "(refused by the client)" in err


def test_timeout_ends_the_wait_for_an_unreachable_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing listens on the target: without `--timeout` the command retries for the
    client's 30 s; with it, it gives up within it, one line and status 1."""
    argv = ["generate", "--target", "127.0.0.1:1", "--model", "m", "--prompt", "hi"]
    started = time.monotonic()
    code = main([*argv, "--timeout", "1.5"])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1, err
    assert took < 1.5 + 3.0, took  # within it and closing the channel, not the client's 30 s
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith("error: DEADLINE_EXCEEDED: not done within --timeout 1.5 s")
    assert "UNAVAILABLE" in err  # what it was retrying


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_timeout_that_is_no_positive_number_exits_2(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--target", "127.0.0.1:1", "--model", "m", "--prompt", "hi"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--timeout", value])
    assert exit_.value.code == 2
    assert "argument --timeout" in capsys.readouterr().err


async def test_a_generation_within_its_timeout_is_printed_and_its_session_closed(
    server: SeqServeServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["generate", "--target", f"127.0.0.1:{server.port}", "--model", "tok",
            "--prompt", "hi", "--max-tokens", "5", "--seed", "3", "--timeout", "30"]  # fmt: skip
    args = build_parser().parse_args(argv)
    await generate_cmd._generate(args)  # what `run` runs (on this test's event loop)
    assert capsys.readouterr().out.startswith("hi")
    assert server.engine.stats().sessions_in_memory == 0  # closed


@pytest.mark.parametrize(
    ("flags", "out", "error"),
    [
        (["--model", "nope"], "", "error: NOT_FOUND: "),  # refused before the prompt is written
        (["--model", "tok", "--max-tokens", "100000000"], "hi\n", "error: INVALID_ARGUMENT: "),
    ],
)
async def test_a_refused_generation_is_one_error_line_after_the_prompt_s_line_ends(
    server: SeqServeServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    out: str,
    error: str,
) -> None:
    """The error line on stderr starts the line (no blank line before it), and a prompt
    already written to stdout has its line ended there, so stdout ends with a newline."""
    argv = ["generate", "--target", f"127.0.0.1:{server.port}", "--prompt", "hi", *flags]
    code = await asyncio.to_thread(generate_cmd.run, build_parser().parse_args(argv))
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == out
    assert captured.err.startswith(error) and captured.err.count("\n") == 1, captured.err
    assert server.engine.stats().sessions_in_memory == 0  # the refused one's session closed


@pytest.mark.parametrize("target", ["", "127.0.0.1:99999", "127.0.0.1:0", "http://127.0.0.1:1"])
def test_a_target_that_is_not_host_port_exits_2_with_one_line(
    target: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The check `loadtest` makes (one function): gRPC printed C-core errors for "" and wrapped
    the port of 127.0.0.1:99999 (connecting to 34463), status 1 after its retries."""
    argv = ["generate", "--target", target, "--model", "m", "--prompt", "hi", "--timeout", "2"]
    code = main(argv)
    err = capfd.readouterr().err  # the file descriptor: gRPC's C core writes there
    assert code == 2, err
    assert err.startswith("error: target must be host:port") and repr(target) in err, err
    assert len(err.strip().splitlines()) == 1, err

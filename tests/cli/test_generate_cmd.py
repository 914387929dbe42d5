"""`seqserve generate`'s argument errors: one line and exit 2, before any call."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.cli.main import main

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

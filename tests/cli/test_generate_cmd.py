"""`seqserve generate`'s argument errors: one line and exit 2, before any call."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli.main import main


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

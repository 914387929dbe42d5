"""Metrics over TLS asked for without the server's certificate and key: refused at start-up,
not served in plain text."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli.main import main
from service.settings import SecuritySettings


def test_metrics_tls_without_the_pair_is_refused(tmp_path: Path) -> None:
    for pair in ({}, {"tls_cert": tmp_path / "c.pem"}, {"tls_key": tmp_path / "k.pem"}):
        with pytest.raises(ValidationError, match=r"metrics_tls .* needs --tls-cert and --tls-key"):
            SecuritySettings(metrics_tls=True, **pair)
    both = SecuritySettings(metrics_tls=True, tls_cert=tmp_path / "c", tls_key=tmp_path / "k")
    assert both.metrics_tls
    assert not SecuritySettings().metrics_tls  # plain metrics, no pair: as before


def test_serve_with_metrics_tls_and_no_certificate_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEQSERVE_SECURITY__METRICS_TLS", "true")
    # No store: should the check be missing, serve stops at that instead of starting.
    argv = ["serve", "--store", str(tmp_path / "no-store"), "--port", "0", "--metrics-port",
            "0", "--http-port", "-1", "--spill-dir", str(tmp_path / "spill")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "metrics_tls (SEQSERVE_SECURITY__METRICS_TLS) needs --tls-cert and --tls-key" in err
    assert "plain text" in err and "Traceback" not in err

"""`seqserve --help`, every subcommand's `--help` and `--version` never import torch or numpy
(they stay fast), and help shows defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import runpy, sys
sys.argv = ["seqserve", *sys.argv[1:]]
try:
    runpy.run_module("service.cli.main", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "safetensors", "numpy") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["serve", "--help"],
        ["predict", "--help"],
        ["generate", "--help"],
        ["models", "--help"],
        ["models", "verify", "--help"],
        ["train", "--help"],
        ["loadtest", "--help"],
        ["auth", "--help"],
        ["config", "show", "--help"],
    ],
)
def test_help_and_version_do_not_import_torch_or_numpy(args: list[str]) -> None:
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "HEAVY:", proc.stderr


def test_version() -> None:
    from importlib.metadata import version

    proc = _run("--version")
    assert proc.stdout.strip() == f"seqserve {version('seqserve')}"


def test_serve_help_lists_every_setting_with_its_default() -> None:
    from service.config_sources import leaves

    out = _run("serve", "--help").stdout
    flat = " ".join(out.split())
    for leaf in leaves():
        assert leaf.flag in out, leaf.flag
        assert leaf.env in flat, leaf.env
    for alias in ("--store", "--host", "--port", "--metrics-port", "--http-port", "--state-url",
                  "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-tokens", "--insecure",
                  "--spill-dir", "--spill-max-bytes", "--pool-bytes", "--max-sessions", "--ttl",
                  "--workers", "--port-file", "--config"):  # fmt: skip
        assert f"{alias} " in out or f"{alias}," in out, alias
    assert "[default: 50051; env SEQSERVE_SERVER__PORT]" in flat
    assert "[default: 268435456; env SEQSERVE_SESSIONS__POOL_BYTES]" in flat


def test_generate_help_says_unset_sampling_is_the_sessions_default() -> None:
    flat = " ".join(_run("generate", "--help").stdout.split())
    assert "--temperature TEMPERATURE 0 = greedy; unset: the session's default sampling" in flat
    assert "(default: 200)" in flat


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("SEQSERVE_SESSIONS__POOL_BYTES", "-5",
         "seqserve: invalid setting sessions.pool_bytes (--pool-bytes, --sessions.pool-bytes, "
         "SEQSERVE_SESSIONS__POOL_BYTES): must be > 0, got -5 [from env "
         "SEQSERVE_SESSIONS__POOL_BYTES]"),
        # pydantic-settings alone said `error parsing value for field "engine" from source
        # "EnvSettingsSource"`: the commands that built Settings() themselves said that.
        ("SEQSERVE_ENGINE__PRELOAD", "bytes-lstm",
         "seqserve: invalid environment: SEQSERVE_ENGINE__PRELOAD='bytes-lstm': engine.preload "
         "takes a JSON list in the environment, e.g. SEQSERVE_ENGINE__PRELOAD='[\"bytes-lstm\"]'"),
    ],
)  # fmt: skip
def test_a_bad_environment_is_one_line_for_every_command(
    tmp_path: Path, variable: str, value: str, line: str
) -> None:
    """The line `serve` and `config show` print, from every command that reads the settings."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    env[variable] = value
    for args in (["models", "list"], ["predict", "--model", "bytes-lstm", "--text", "hi"],
                 ["config", "show"]):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "service.cli.main", *args],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [line], args


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`seqserve config show | head -1`: the pipe's reader exits before the command writes. No
    traceback, and no error status (`generate` into `head` likewise: tests/api/
    test_generate_cli.py)."""
    # The entry point, as the console script calls it (`main` alone is not where it is handled).
    code = "from service.cli.main import run; run()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "config", "show"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the command has imported anything, let alone written
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_run_lets_a_pipe_other_than_stdout_break_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a reader of stdout that went away is quiet; another broken pipe is an error."""
    from service.cli import main as cli_main

    def broken() -> int:
        raise BrokenPipeError("some other pipe")

    monkeypatch.setattr(cli_main, "main", broken)
    with pytest.raises(BrokenPipeError, match="some other pipe"):
        cli_main.run()  # stdout here is pytest's capture, not a broken pipe

"""`seqserve config show` and the one-line errors of bad settings, from real subprocesses:
a bad environment variable, flag or config file value gives one line on stderr and exit 2
(for `serve` and `config show` alike), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def seqserve(
    *args: str, tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m service.cli.main ARGS` in the repo root with no SEQSERVE_* from outside."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    clean["SEQSERVE_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("seqserve: invalid setting "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", [("serve",), ("config", "show")])
def test_bad_env_value(command: tuple[str, ...], tmp_path: Path) -> None:
    proc = seqserve(*command, tmp_path=tmp_path, env={"SEQSERVE_SESSIONS__POOL_BYTES": "-5"})
    assert_one_line_error(
        proc,
        "sessions.pool_bytes (--pool-bytes, --sessions.pool-bytes, SEQSERVE_SESSIONS__POOL_BYTES)",
        "must be > 0, got -5 [from env SEQSERVE_SESSIONS__POOL_BYTES]",
    )


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("SEQSERVE_SERVER__MAX_MESSAGE_BYTES", "1", "must be >= 65536, got 1"),
        ("SEQSERVE_SESSIONS__JOURNAL_SEGMENT_BYTES", "1", "must be >= 256, got 1"),
        ("SEQSERVE_ENGINE__TORCH_THREADS", "100000", "must be <= 1024, got 100000"),
        ("SEQSERVE_SESSIONS__SWEEP_INTERVAL_SECONDS", "1e-6", "must be >= 0.01, got 1e-6"),
        ("SEQSERVE_SERVER__GRACE_SECONDS", "inf", "must be a finite number, got inf"),
    ],
)
def test_sizes_and_periods_past_their_bounds_are_refused_at_start(
    tmp_path: Path, variable: str, value: str, why: str
) -> None:
    """Accepted before, they broke the server once it ran: every message refused, a file per
    journal write, a crash starting torch's threads, a sweeper that spun. Refused as `serve`
    loads its settings (`config show` loads them the same way, and ran on before: it is what
    is checked here, so the check of the code before this fix does not start a server)."""
    proc = seqserve("config", "show", tmp_path=tmp_path, env={variable: value})
    assert_one_line_error(proc, f"{variable}): {why} [from env {variable}]")


@pytest.mark.parametrize("command", [("serve",), ("config", "show")])
def test_bad_flag(command: tuple[str, ...], tmp_path: Path) -> None:
    proc = seqserve(*command, "--port", "70000", tmp_path=tmp_path)
    assert_one_line_error(proc, "server.port (--port,", "must be <= 65535, got 70000 [from flag]")


def test_bad_config_file_value(tmp_path: Path) -> None:
    config = tmp_path / "seqserve.toml"
    config.write_text("[engine]\nmax_batch_size = 0\n")
    proc = seqserve("serve", "--config", str(config), tmp_path=tmp_path)
    assert_one_line_error(
        proc, "engine.max_batch_size", f"must be > 0, got 0 [from config file {config}]"
    )


def test_unknown_config_key_and_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "seqserve.toml"
    config.write_text("[sessions]\npool_byte = 5\n")
    proc = seqserve("serve", "--config", str(config), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"seqserve: config file {config}: unknown setting sessions.pool_byte; did you mean "
        "sessions.pool_bytes (--sessions.pool-bytes, SEQSERVE_SESSIONS__POOL_BYTES)?"
    )
    proc = seqserve("serve", "--config", str(tmp_path / "absent.toml"), tmp_path=tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_unavailable_device_is_refused_at_start(tmp_path: Path) -> None:
    proc = seqserve("serve", tmp_path=tmp_path, env={"SEQSERVE_ENGINE__DEVICE": "cuda:99"})
    assert_one_line_error(proc, "engine.device", "cuda:99 is not available")


def test_missing_store_is_refused(tmp_path: Path) -> None:
    proc = seqserve("serve", "--store", str(tmp_path / "nostore"), tmp_path=tmp_path)
    assert_one_line_error(proc, "model_store (--store", "no model store at", "[from flag]")


@pytest.mark.parametrize("store", ["missing", "empty", "a file"])
@pytest.mark.parametrize("as_json", [False, True])
def test_config_show_without_a_store_gives_serves_one_line_and_no_table(
    tmp_path: Path, store: str, as_json: bool
) -> None:
    """`config show` answers what `serve` would: its one line, status 2, and nothing on
    stdout (it printed the whole table first, then the error, so a script reading the JSON
    took a configuration `serve` refuses for a good one)."""
    path = tmp_path / "store"
    if store == "empty":
        path.mkdir()
        (path / "README.md").write_text("no models yet")
    elif store == "a file":
        path.write_text("not a store")
    json_flag = ["--json"] if as_json else []
    by_flag = seqserve("config", "show", *json_flag, "--store", str(path), tmp_path=tmp_path)
    if store == "empty":  # a folder with no models is a store: `serve` starts on it
        assert by_flag.returncode == 0, by_flag.stderr
        assert by_flag.stdout and by_flag.stderr == ""
        return
    assert by_flag.stdout == ""
    assert_one_line_error(by_flag, f"no model store at {path}", "[from flag]")
    by_env = seqserve(
        "config", "show", *json_flag, tmp_path=tmp_path, env={"SEQSERVE_MODEL_STORE": str(path)}
    )
    assert by_env.stdout == ""
    assert_one_line_error(by_env, f"no model store at {path}", "[from env SEQSERVE_MODEL_STORE]")


@pytest.mark.parametrize("command", [("serve",), ("config", "show")])
def test_a_data_directory_that_is_a_file_names_seqserve_data_dir(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    """`SEQSERVE_DATA_DIR` at a file: one line naming that variable, before anything starts
    (`serve` started, then named SEQSERVE_SESSIONS__SPILL_DIR, which the operator never set;
    `config show` showed the table and exit 0)."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    ports = ("--port", "0", "--metrics-port", "-1", "--http-port", "-1")  # `serve` started
    proc = seqserve(*command, *ports, tmp_path=tmp_path, env={"SEQSERVE_DATA_DIR": str(afile)})
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip() == (
        f"seqserve: invalid SEQSERVE_DATA_DIR: {afile} is not a directory (the default state "
        f"directory, sessions.spill_dir, is {afile / 'spill'})"
    )


def test_config_show_outside_a_project_is_one_line(tmp_path: Path) -> None:
    """Run where there is no `./model_store`: the default store is missing."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "config", "show"],
        cwd=tmp_path,
        env={**clean, "SEQSERVE_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout == ""
    assert_one_line_error(proc, f"no model store at {tmp_path / 'model_store'} (point --store")
    assert "[from" not in proc.stderr  # the default: the line's path says where it looked


def test_config_show_provenance(tmp_path: Path) -> None:
    config = tmp_path / "seqserve.toml"
    config.write_text(
        '[server]\nport = 7000\nhost = "127.0.0.3"\n'
        "[sessions]\nttl_seconds = 30\nmax_sessions = 9\n"
        "[security]\nreflection = false\n"
    )
    env = {"SEQSERVE_SERVER__PORT": "7001", "SEQSERVE_SESSIONS__MAX_SESSIONS": "8"}
    proc = seqserve(
        "config", "show", "--json", "--config", str(config), "--max-sessions", "7",
        "--engine.max-batch-size", "32", "--no-security.reflection", tmp_path=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["server.port"] == {"value": 7001, "source": "env SEQSERVE_SERVER__PORT"}
    assert shown["server.host"] == {"value": "127.0.0.3", "source": f"config file {config}"}
    assert shown["sessions.ttl_seconds"] == {"value": 30.0, "source": f"config file {config}"}
    assert shown["sessions.max_sessions"] == {"value": 7, "source": "flag"}
    assert shown["engine.max_batch_size"] == {"value": 32, "source": "flag"}
    assert shown["security.reflection"] == {"value": False, "source": "flag"}
    assert shown["sessions.pool_bytes"] == {"value": 256 * 1024 * 1024, "source": "default"}
    assert shown["server.metrics_port"] == {"value": 9464, "source": "default"}


def test_config_show_table(tmp_path: Path) -> None:
    proc = seqserve("config", "show", "--ttl", "45", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    assert rows["sessions.ttl_seconds"] == ["45.0", "flag"]
    assert rows["server.port"] == ["50051", "default"]
    assert rows["model_store"][0] == json.dumps(str(REPO_ROOT / "model_store"))


@pytest.mark.parametrize("as_json", [False, True])
def test_config_show_hides_url_passwords(tmp_path: Path, as_json: bool) -> None:
    url = "redis://:hunter2@localhost:6379/0"
    env = {"SEQSERVE_SESSIONS__STATE_URL": "rediss://user:s3cret@cache:6380/1?password=p4ss"}
    by_flag = seqserve(
        "config", "show", *(["--json"] if as_json else []), "--state-url", url, tmp_path=tmp_path
    )
    by_env = seqserve(
        "config", "show", *(["--json"] if as_json else []), tmp_path=tmp_path, env=env
    )
    for proc in (by_flag, by_env):
        assert proc.returncode == 0, proc.stderr
        for secret in ("hunter2", "s3cret", "p4ss"):
            assert secret not in proc.stdout + proc.stderr
    if as_json:
        assert json.loads(by_flag.stdout)["sessions.state_url"] == {
            "value": "redis://:***@localhost:6379/0", "source": "flag",
        }  # fmt: skip
        shown = json.loads(by_env.stdout)["sessions.state_url"]["value"]
        assert shown == "rediss://user:***@cache:6380/1?password=***"
    else:
        row = next(x for x in by_flag.stdout.splitlines() if x.startswith("sessions.state_url"))
        assert row.split()[1:] == ['"redis://:***@localhost:6379/0"', "flag"]
    refused = seqserve(  # an invalid URL's error line does not echo the password either
        "config", "show", "--state-url", "mysql://u:hunter2@h/0", tmp_path=tmp_path
    )
    assert_one_line_error(refused, "sessions.state_url", "got mysql://u:***@h/0")
    assert "hunter2" not in refused.stderr


def test_an_empty_environment_value_means_unset(tmp_path: Path) -> None:
    """Compose files write `X=${X:-}`: an empty value is not "" (nor the directory ".")."""
    env = {"SEQSERVE_SESSIONS__SPILL_DIR": "", "SEQSERVE_SERVER__HOST": ""}
    proc = seqserve("config", "show", "--json", tmp_path=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["sessions.spill_dir"] == {  # in the data directory `seqserve` set
        "value": str(tmp_path / "data" / "spill"), "source": "env SEQSERVE_DATA_DIR",
    }  # fmt: skip
    assert shown["server.host"]["source"] == "default"


def test_config_show_names_the_data_directory_variable(tmp_path: Path) -> None:
    """A spill directory in `$SEQSERVE_DATA_DIR` shows that variable as its source, in the
    table as in the JSON (both said `default`)."""
    data = tmp_path / "elsewhere"
    env = {"SEQSERVE_DATA_DIR": str(data)}
    table = seqserve("config", "show", tmp_path=tmp_path, env=env)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines()}
    value, *source = rows["sessions.spill_dir"]
    assert (value, source) == (json.dumps(str(data / "spill")), ["env", "SEQSERVE_DATA_DIR"])
    shown = json.loads(seqserve("config", "show", "--json", tmp_path=tmp_path, env=env).stdout)
    assert shown["sessions.spill_dir"]["source"] == "env SEQSERVE_DATA_DIR"


@pytest.mark.parametrize("command", [("serve",), ("config", "show")])
def test_a_config_file_not_in_utf8_is_one_line(command: tuple[str, ...], tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(b"# r\xe9glages\n[server]\nport = 53304\n")
    proc = seqserve(*command, "--config", str(config), tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"seqserve: config file {config}: not UTF-8 text (byte 3); " + (
        "save it as UTF-8"
    )


def test_a_list_variable_not_in_json_names_the_variable(tmp_path: Path) -> None:
    proc = seqserve(
        "config", "show", tmp_path=tmp_path, env={"SEQSERVE_ENGINE__PRELOAD": "bytes-lstm"}
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "seqserve: invalid environment: SEQSERVE_ENGINE__PRELOAD='bytes-lstm': engine.preload "
        """takes a JSON list in the environment, e.g. SEQSERVE_ENGINE__PRELOAD='["bytes-lstm"]'"""
    )

"""Layering flags > env > config file > defaults, provenance, and the one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.config_sources import InvalidSetting, leaves, load, read_config_file
from service.settings import Settings

REPO_STORE = Path(__file__).resolve().parent.parent / "model_store"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SEQSERVE_"):
            monkeypatch.delenv(key)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "seqserve.toml"
    path.write_text(text)
    return path


def test_precedence_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(
        tmp_path,
        '[server]\nport = 7000\nmetrics_port = 7100\nhost = "127.0.0.2"\n'
        "[sessions]\nttl_seconds = 30\n",
    )
    monkeypatch.setenv("SEQSERVE_SERVER__PORT", "7001")
    monkeypatch.setenv("SEQSERVE_SERVER__METRICS_PORT", "7101")
    loaded = load({("server", "port"): "7002"}, config)
    s = loaded.settings
    assert (s.server.port, s.server.metrics_port, s.server.host) == (7002, 7101, "127.0.0.2")
    assert s.sessions.ttl_seconds == 30.0
    assert loaded.sources["server.port"] == "flag"
    assert loaded.sources["server.metrics_port"] == "env SEQSERVE_SERVER__METRICS_PORT"
    assert loaded.sources["server.host"] == f"config file {config}"
    assert loaded.sources["sessions.ttl_seconds"] == f"config file {config}"
    assert loaded.sources["sessions.pool_bytes"] == "default"
    assert set(loaded.sources) == {leaf.name for leaf in leaves()}


@pytest.mark.parametrize("variable", ["SEQSERVE_DATA_DIR", "XDG_STATE_HOME", None])
def test_a_spill_dir_in_the_data_directory_names_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str | None
) -> None:
    """The spill directory's default is in the data directory, which an environment variable
    may set: the source says so (it said `default` for a directory the operator had set)."""
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if variable is not None:
        monkeypatch.setenv(variable, str(tmp_path / "state"))
    loaded = load()
    if variable is None:
        assert loaded.sources["sessions.spill_dir"] == "default"
        want = tmp_path / "home" / ".local" / "state" / "seqserve" / "spill"
    else:
        assert loaded.sources["sessions.spill_dir"] == f"env {variable}"
        sub = () if variable == "SEQSERVE_DATA_DIR" else ("seqserve",)
        want = tmp_path.joinpath("state", *sub, "spill")
    assert loaded.settings.sessions.spill_dir == want
    monkeypatch.setenv("SEQSERVE_SESSIONS__SPILL_DIR", str(tmp_path / "mine"))  # set: its own
    assert load().sources["sessions.spill_dir"] == "env SEQSERVE_SESSIONS__SPILL_DIR"
    assert load({("sessions", "spill_dir"): str(tmp_path)}).sources["sessions.spill_dir"] == "flag"


def test_defaults_alone_equal_the_model() -> None:
    assert load().settings == Settings.model_validate({})


def test_bad_flag_names_the_setting_and_its_names() -> None:
    with pytest.raises(InvalidSetting) as info:
        load({("sessions", "pool_bytes"): "-5"})
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("invalid setting sessions.pool_bytes (--pool-bytes, ")
    assert "--sessions.pool-bytes" in msg and "SEQSERVE_SESSIONS__POOL_BYTES" in msg
    assert "must be > 0, got -5 [from flag]" in msg


def test_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQSERVE_ENGINE__MAX_BATCH_SIZE", "lots")
    with pytest.raises(InvalidSetting, match=r"engine\.max_batch_size .*must be an integer, got "
                       r"lots \[from env SEQSERVE_ENGINE__MAX_BATCH_SIZE\]"):  # fmt: skip
        load()


def test_unparseable_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQSERVE_SERVER", "{not json")
    with pytest.raises(InvalidSetting, match="invalid environment"):
        load()


@pytest.mark.parametrize(
    ("value", "example"), [("bytes-lstm", '["bytes-lstm"]'), ("a, b:2", '["a", "b:2"]')]
)
def test_a_list_variable_that_is_not_json_is_named(
    monkeypatch: pytest.MonkeyPatch, value: str, example: str
) -> None:
    monkeypatch.setenv("SEQSERVE_ENGINE__PRELOAD", value)
    with pytest.raises(InvalidSetting) as info:
        load()
    assert str(info.value) == (
        f"invalid environment: SEQSERVE_ENGINE__PRELOAD={value!r}: engine.preload takes a JSON "
        f"list in the environment, e.g. SEQSERVE_ENGINE__PRELOAD='{example}'"
    )


def test_a_config_file_not_in_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# r\xe9glages\n[server]\nport = 7000\n")
    with pytest.raises(InvalidSetting, match=rf"^config file {path}: not UTF-8 text \(byte 3\)"):
        read_config_file(path)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidSetting, match=r"unknown setting sessions\.ttl$"):
        read_config_file(_toml(tmp_path, "[sessions]\nttl = 3\n"))
    with pytest.raises(InvalidSetting, match="unknown setting colour"):
        read_config_file(_toml(tmp_path, 'colour = "blue"\n'))
    with pytest.raises(InvalidSetting, match="must be a \\[server\\] table"):
        read_config_file(_toml(tmp_path, "server = 3\n"))
    with pytest.raises(InvalidSetting, match="not valid TOML"):
        read_config_file(_toml(tmp_path, "[server\n"))
    with pytest.raises(InvalidSetting, match="no such file"):
        read_config_file(tmp_path / "absent.toml")
    # A TOML bool for a number is refused as the same word from the environment is (pydantic
    # read `false` as 0: a metrics port of false bound a random port).
    for text, word in [("[server]\nmetrics_port = false\n", "false"),
                       ("[sessions]\npool_bytes = true\n", "true")]:  # fmt: skip
        with pytest.raises(InvalidSetting, match=rf"must be an integer, got {word} \[from config"):
            load(config_file=_toml(tmp_path, text))
    told = load(config_file=_toml(tmp_path, "[security]\nreflection = false\n"))
    assert told.settings.security.reflection is False  # a bool setting takes it as ever
    bad = _toml(tmp_path, '[sessions]\nfsync = "sometimes"\n')
    with pytest.raises(InvalidSetting, match=r"sessions\.fsync .*must be one of .*\[from config"):
        load(config_file=bad)


def test_a_seqserve_variable_that_names_no_setting_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A misspelled section was ignored without a word (the default stayed); `serve` logs a
    warning for each, with the nearest setting's variable."""
    from service.config_sources import unknown_environment

    for name in list(os.environ):
        if name.upper().startswith("SEQSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SEQSERVE_SESSION__POOL_BYTES", "5")
    monkeypatch.setenv("SEQSERVE_NOTHING_LIKE_IT", "1")
    for fine in ("SEQSERVE_SESSIONS__POOL_BYTES", "SEQSERVE_DATA_DIR", "SEQSERVE_TOKEN",
                 "SEQSERVE_MODEL_STORE", "SEQSERVE_SERVER__GC_GEN0_THRESHOLD"):  # fmt: skip
        monkeypatch.setenv(fine, "1")
    assert unknown_environment() == [
        "SEQSERVE_NOTHING_LIKE_IT is not a setting and is ignored",
        "SEQSERVE_SESSION__POOL_BYTES is not a setting and is ignored; did you mean "
        "SEQSERVE_SESSIONS__POOL_BYTES?",
    ]


def test_a_misspelled_setting_is_told_its_nearest_and_a_list_item_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelled name within a real section is refused (it is not the warning of a variable
    whose section names none) and now names the setting it is near; an item of a list setting
    named `engine.preload.0`, with no flag, variable or source."""
    monkeypatch.setenv("SEQSERVE_SERVER__PROT", "1")
    with pytest.raises(InvalidSetting) as refused:
        load()
    assert str(refused.value) == (
        "unknown setting server.prot [from env SEQSERVE_SERVER__PROT]; did you mean "
        "server.port (--server.port, SEQSERVE_SERVER__PORT)?"
    )
    monkeypatch.delenv("SEQSERVE_SERVER__PROT")
    with pytest.raises(InvalidSetting, match=r"unknown setting server\.prot; did you mean"):
        read_config_file(_toml(tmp_path, "[server]\nprot = 3\n"))
    monkeypatch.setenv("SEQSERVE_ENGINE__PRELOAD", '["ok", 1]')
    with pytest.raises(InvalidSetting) as refused:
        load()
    assert str(refused.value).startswith(
        "invalid setting engine.preload (item 2) (--engine.preload, SEQSERVE_ENGINE__PRELOAD): "
    ), refused.value
    assert str(refused.value).endswith("[from env SEQSERVE_ENGINE__PRELOAD]"), refused.value


def test_a_setting_from_its_sections_variable_names_that_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`SEQSERVE_SESSIONS='{"ttl_seconds": 30}'` was shown as from SEQSERVE_SESSIONS__TTL_SECONDS,
    a variable that was not set (and so were its errors)."""
    monkeypatch.setenv("SEQSERVE_SESSIONS", '{"ttl_seconds": 30}')
    assert load().sources["sessions.ttl_seconds"] == "env SEQSERVE_SESSIONS (its ttl_seconds)"
    monkeypatch.setenv("SEQSERVE_SESSIONS", '{"pool_bytes": -1}')
    with pytest.raises(InvalidSetting, match=r"\[from env SEQSERVE_SESSIONS \(its pool_bytes\)\]$"):
        load()
    monkeypatch.delenv("SEQSERVE_SESSIONS")
    monkeypatch.setenv("SEQSERVE_SESSIONS__TTL_SECONDS", "30")
    assert load().sources["sessions.ttl_seconds"] == "env SEQSERVE_SESSIONS__TTL_SECONDS"

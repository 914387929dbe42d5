"""The Settings model: every field documented and validated; cross-field rules; the env reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config_sources import leaves
from service.settings import (
    EngineSettings,
    SecuritySettings,
    ServerSettings,
    SessionSettings,
    Settings,
    environment_values,
)


def test_defaults_are_valid_and_every_setting_has_a_docstring() -> None:
    Settings.model_validate({})
    all_leaves = list(leaves())
    assert len(all_leaves) >= 40
    undocumented = [leaf.name for leaf in all_leaves if not (leaf.info.description or "").strip()]
    assert undocumented == []


@pytest.mark.parametrize(
    ("model", "field", "bad"),
    [
        (ServerSettings, "port", -1),
        (ServerSettings, "port", 65536),
        (ServerSettings, "metrics_port", -2),
        (ServerSettings, "http_port", 70000),
        (ServerSettings, "host", ""),
        (ServerSettings, "grace_seconds", -0.1),
        (ServerSettings, "max_message_bytes", 0),
        (ServerSettings, "max_message_bytes", 1),  # every request and reply refused
        (ServerSettings, "max_message_bytes", 64 * 1024 - 1),
        (ServerSettings, "max_message_bytes", 1 << 30),  # gRPC's 2x is past a C int
        (ServerSettings, "grace_seconds", float("inf")),
        (ServerSettings, "grace_seconds", float("nan")),
        (ServerSettings, "gc_gen0_threshold", 2**31),  # gc.set_threshold: OverflowError
        (ServerSettings, "gc_thaw_seconds", 0.01),  # a full collection 100 times a second
        (EngineSettings, "torch_threads", 1025),
        (EngineSettings, "torch_threads", 0),
        (EngineSettings, "max_batch_size", 0),
        (EngineSettings, "max_queue", -1),
        (EngineSettings, "device", "gpu"),
        (EngineSettings, "device", "cuda:x"),
        (SessionSettings, "pool_bytes", -5),
        (SessionSettings, "max_sessions", 0),
        (SessionSettings, "ttl_seconds", 0),
        (SessionSettings, "slot_wait_seconds", -1),
        (SessionSettings, "ttl_seconds", float("inf")),
        (SessionSettings, "max_ttl_seconds", 10 * 365 * 86400 + 1),
        (SessionSettings, "sweep_interval_seconds", 0.001),
        (SessionSettings, "fsync_interval_seconds", 0.0001),
        (SessionSettings, "journal_segment_bytes", 1),
        (SessionSettings, "journal_segment_bytes", 255),
        (SessionSettings, "fsync", "sometimes"),
        (SessionSettings, "state_url", "http://example"),
        # redis-py raised tracebacks at `serve` for these, or read /abc as database 0:
        (SessionSettings, "state_url", "redis://127.0.0.1:99999/0"),
        (SessionSettings, "state_url", "redis://127.0.0.1:notaport/0"),
        (SessionSettings, "state_url", "redis://[::1/0"),
        (SessionSettings, "state_url", "redis://127.0.0.1:6379/0?socket_timeout=abc"),
        (SessionSettings, "state_url", "redis://127.0.0.1:6379/0?x=1"),
        (SessionSettings, "state_url", "redis://127.0.0.1:6379/0?ssl_cert_reqs=none"),
        (SessionSettings, "state_url", "redis://127.0.0.1:6379/abc"),
        (SessionSettings, "state_url", "redis://127.0.0.1:0/0"),
        (SessionSettings, "state_url", "redis:///0"),
        (SessionSettings, "spill_dir", ""),  # not the current directory
        (SessionSettings, "spill_dir", "  "),
        (SecuritySettings, "tokens_per_second", -1),
        (SecuritySettings, "tokens_per_second", float("inf")),
        (SecuritySettings, "sessions_per_principal", -1),
    ],
)
def test_out_of_range_values_are_refused(model: type, field: str, bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        model(**{field: bad})
    assert info.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(
    ("model", "field", "good"),
    [
        (ServerSettings, "port", 0),
        (ServerSettings, "port", 65535),
        (ServerSettings, "metrics_port", -1),
        (ServerSettings, "http_port", -1),
        (EngineSettings, "device", "cuda:1"),
        (ServerSettings, "max_message_bytes", 64 * 1024),
        (ServerSettings, "max_message_bytes", (1 << 30) - 1),
        (ServerSettings, "gc_gen0_threshold", 2**31 - 1),
        (ServerSettings, "gc_thaw_seconds", 0),
        (ServerSettings, "gc_thaw_seconds", 0.05),
        (EngineSettings, "torch_threads", 1024),
        (SessionSettings, "max_ttl_seconds", 10 * 365 * 86400),
        (SessionSettings, "sweep_interval_seconds", 0.01),
        (SessionSettings, "fsync_interval_seconds", 0.001),
        (SessionSettings, "journal_segment_bytes", 256),
        (EngineSettings, "inline_max_rows", 0),
        (SessionSettings, "slot_wait_seconds", 0),
        (SessionSettings, "state_url", "redis://127.0.0.1:6379/0"),
        (SessionSettings, "state_url", "rediss://:pw@redis.example:6380"),
        (SessionSettings, "state_url", "redis://[::1]:6379/"),
        (SessionSettings, "state_url", "redis://h:6379/0?socket_timeout=5&password=p"),
        (SessionSettings, "state_url", "rediss://h:6380/1?ssl_cert_reqs=none"),
        (SessionSettings, "state_url", "redis://h:6379/0?client_name=replica-a"),
        (SessionSettings, "state_url", "redis://h:6379/0?socket_timeout="),  # blank: skipped
        (SessionSettings, "state_url", "sqlite:/tmp/state.db"),
        (SecuritySettings, "tokens_per_second", 0),
    ],
)
def test_edge_values_are_accepted(model: type, field: str, good: object) -> None:
    assert getattr(model(**{field: good}), field) == good


@pytest.mark.parametrize(("value", "ok"), [(0, True), (0.001, False), (0.01, True), (2.0, True)])
def test_registry_poll_is_off_or_at_least_ten_milliseconds(value: float, ok: bool) -> None:
    """A poll every microsecond re-read the store without pause (a core's worth of CPU)."""
    if ok:
        assert (
            Settings.model_validate({"registry_poll_seconds": value}).registry_poll_seconds == value
        )
        return
    with pytest.raises(ValidationError, match=r"must be 0 \(off\) or >= 0\.01"):
        Settings.model_validate({"registry_poll_seconds": value})


def test_ttl_over_max_ttl_is_refused() -> None:
    with pytest.raises(ValidationError, match="over max_ttl_seconds"):
        SessionSettings(ttl_seconds=100, max_ttl_seconds=10)


def test_unknown_keys_in_a_section_are_refused() -> None:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate({"sessions": {"pool_byte": 5}})
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_log_level_any_case() -> None:
    assert Settings.model_validate({"log_level": "debug"}).log_level == "DEBUG"


def test_environment_values_nested(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEQSERVE_SESSIONS__POOL_BYTES", "1234")
    monkeypatch.setenv("SEQSERVE_MODEL_STORE", str(tmp_path))
    values = environment_values()
    assert values["sessions"] == {"pool_bytes": "1234"}
    assert Path(values["model_store"]) == tmp_path


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(" `"): line for line in section.splitlines()
            if line.startswith("| `")}  # fmt: skip
    for leaf in leaves():
        assert leaf.name in rows, f"README's Configuration table lacks {leaf.name}"
        for alias in leaf.aliases:
            assert f"`{alias}`" in rows[leaf.name], (leaf.name, alias)
    assert set(rows) == {leaf.name for leaf in leaves()}


def test_an_empty_model_store_path_is_refused() -> None:
    with pytest.raises(ValidationError, match="must name a directory"):
        Settings(model_store="")  # type: ignore[arg-type]


def test_a_path_from_home_is_read_as_a_shell_reads_it() -> None:
    """`~/x` from a config file or a variable made a directory named `~` in the working
    directory."""
    home = Path.home()
    assert SessionSettings(spill_dir="~/seqserve-spill").spill_dir == home / "seqserve-spill"
    assert SecuritySettings(auth_tokens="~/tokens").auth_tokens == home / "tokens"
    assert SessionSettings(spill_dir="a~b").spill_dir == Path("a~b")

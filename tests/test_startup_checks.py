"""What only the machine can tell, checked before anything starts: the store and the state
directory, the TLS and token files, the device; each a one-line error naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config_sources import InvalidSetting, load
from service.settings import Settings
from service.startup_checks import check_runnable
from tests.test_config_sources import REPO_STORE, _clean_env  # noqa: F401 - the fixture


def test_check_runnable(tmp_path: Path) -> None:
    good = Settings.model_validate({"model_store": REPO_STORE})
    check_runnable(good)
    with pytest.raises(InvalidSetting, match=r"model_store \(--store.*no model store at"):
        check_runnable(Settings.model_validate({"model_store": tmp_path / "nope"}))
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(InvalidSetting, match=r"sessions\.spill_dir .*is not a directory"):
        check_runnable(
            Settings.model_validate({"model_store": REPO_STORE, "sessions": {"spill_dir": afile}})
        )
    with pytest.raises(InvalidSetting, match=r"sessions\.spill_dir .*file is not a directory$"):
        check_runnable(  # a file where one of its parents is to be made
            Settings.model_validate(
                {"model_store": REPO_STORE, "sessions": {"spill_dir": afile / "spill"}}
            )
        )
    with pytest.raises(InvalidSetting, match=r"security.tls_cert \(--tls-cert.*no such file"):
        check_runnable(
            Settings.model_validate(
                {"model_store": REPO_STORE, "security": {"tls_cert": tmp_path / "c.pem"}}
            )
        )


@pytest.mark.parametrize("variable", ["SEQSERVE_DATA_DIR", "XDG_STATE_HOME"])
@pytest.mark.parametrize("depth", [0, 2])
def test_a_data_directory_that_is_a_file_is_refused_naming_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, depth: int
) -> None:
    """The line names the variable the operator set, not SEQSERVE_SESSIONS__SPILL_DIR (nor
    did it come before: the server started, then failed to make its state directory)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv(variable, str(afile.joinpath(*["deeper"] * depth)))
    loaded = load({("model_store",): str(REPO_STORE)})
    with pytest.raises(InvalidSetting) as info:
        check_runnable(loaded.settings, loaded.sources)
    spill = loaded.settings.sessions.spill_dir
    assert str(info.value) == (
        f"invalid {variable}: {afile} is not a directory (the default state directory, "
        f"sessions.spill_dir, is {spill})"
    )
    assert "SPILL_DIR" not in str(info.value)


def test_runnable_errors_say_where_the_value_came_from(tmp_path: Path) -> None:
    loaded = load({("model_store",): str(tmp_path / "nope")})
    with pytest.raises(InvalidSetting, match=r"no model store at .* \[from flag\]$"):
        check_runnable(loaded.settings, loaded.sources)


def test_device_that_torch_does_not_have_is_refused() -> None:
    import torch

    settings = Settings.model_validate({"model_store": REPO_STORE, "engine": {"device": "cuda:7"}})
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(InvalidSetting, match=r"engine\.device .*cuda:7 is not available"):
        check_runnable(settings)

""".ci/install-system-deps.sh: a no-op when the tools are there; as non-root with tools
missing, it names the packages and fails instead of letting tests skip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .conftest import REPO_ROOT

SCRIPT = REPO_ROOT / ".ci" / "install-system-deps.sh"


def _run(path: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, str(SCRIPT)],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_is_a_no_op_when_tools_are_present() -> None:
    result = _run(os.environ["PATH"])

    assert result.returncode == 0, result.stderr
    assert "already present" in result.stdout


def test_non_root_without_tools_names_packages_and_fails(tmp_path: Path) -> None:
    # A PATH with none of the tools; an `id` saying non-root.
    fake_id = tmp_path / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)

    result = _run(str(tmp_path))

    assert result.returncode != 0
    assert "apt-get install -y --no-install-recommends" in result.stderr
    missing = re.search(r"missing system packages: (.*)", result.stderr)
    assert missing is not None, result.stderr
    # promtool and prometheus come from one package: named once.
    assert sorted(missing.group(1).split()) == [
        "chromium", "docker-compose", "nginx", "nodejs", "npm", "prometheus", "redis-server"
    ]  # fmt: skip

"""The built wheel, installed the way a user installs it, away from the repository.

One wheel is built from a copy of the sources (`pip wheel --no-deps --no-build-isolation`:
offline, with the setuptools already installed; no deprecation warning allowed). Two fresh
venvs (no `--system-site-packages`) get it at the same time:

- the server venv: `seqserve[server]`, torch==2.13.0 included, from wherever this machine's
  pip is configured to find it (here a local CPU wheel in pip's find-links), never the repo's
  venv. Installs use `--no-compile`: byte-compiling sympy and torch, not unpacking them, was
  most of the time (fresh server venv here: ~30 s with it off, 45-120 s with it on);
- the client venv: plain `seqserve`, which must not bring torch.

Then, from a directory that holds only a copy of the bundled `model_store/`, the server venv's
`seqserve serve` (no --store) serves it, with its state under `$SEQSERVE_DATA_DIR`, and the
client venv calls it: the Python client and `seqserve generate`. From a directory without a
store, `serve` refuses in one line saying how to point it at one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 300  # seconds, for both venvs together
START_TIMEOUT = 60


@dataclass(frozen=True)
class Installed:
    wheel: Path
    server: Path  # the venv with seqserve[server]
    client: Path  # the venv with seqserve only


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would make the repository importable or change
    seqserve's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SEQSERVE_", "PYTHON", "VIRTUAL_ENV"))
    }
    return {**env, **extra}


def _run(argv: list[str | Path], cwd: Path, timeout: float = 60, **env: str) -> str:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=_clean_env(**env), capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, src / name)
    shutil.copytree(
        REPO_ROOT / "service", src / "service",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )  # fmt: skip
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "-w", str(root / "dist"), str(src)],
        cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    # -v shows the backend's warnings, e.g. "`project.license` as a TOML table is deprecated"
    assert "deprecat" not in (build.stdout + build.stderr).lower(), build.stdout[-3000:]
    (wheel,) = (root / "dist").glob("seqserve-*.whl")

    venvs = {"server": root / "server-venv", "client": root / "client-venv"}
    for venv in venvs.values():  # no pip inside: the running pip installs into them (--python)
        _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    installs = {}
    for name, venv in venvs.items():
        spec = f"{wheel}[server]" if name == "server" else str(wheel)
        installs[name] = subprocess.Popen(
            [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
             "--no-compile", spec],
            cwd=root, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    deadline = time.monotonic() + INSTALL_TIMEOUT
    for name, proc in installs.items():
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, f"pip install into the {name} venv failed:\n{out[-3000:]}"
    return Installed(wheel, venvs["server"], venvs["client"])


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A directory holding only a copy of the bundled store, as a user's would."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(
        REPO_ROOT / "model_store", work / "model_store",
        ignore=shutil.ignore_patterns(".*.lock"),
    )  # fmt: skip
    return work


@pytest.fixture
def served(installed: Installed, store_dir: Path, tmp_path: Path) -> Iterator[dict[str, int]]:
    """`seqserve serve` from the server venv in `store_dir`, no --store; yields its ports."""
    ports = tmp_path / "ports.json"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(installed.server / "bin" / "seqserve"), "serve", "--port", "0",
         "--metrics-port", "0", "--http-port", "-1", "--port-file", str(ports)],
        cwd=store_dir, env=_clean_env(SEQSERVE_DATA_DIR=str(tmp_path / "data")),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ports.exists():
            text = (tmp_path / "serve.log").read_text()
            assert proc.poll() is None, f"serve exited {proc.returncode}:\n{text}"
            assert time.monotonic() < deadline, f"serve did not start:\n{text}"
            time.sleep(0.1)
        yield json.loads(ports.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


CLIENT_SCRIPT = """
import asyncio, sys
from service.client import SeqServeClient

async def main(target):
    async with SeqServeClient(target, timeout=30) as client:
        names = sorted(m.name for m in await client.list_models())
        async with await client.create_session("bytes-lstm", seed=1) as session:
            prediction = await session.feed(text="The weather is ")
        print(names, prediction.position, len(prediction.top))
    print("torch" in sys.modules)

asyncio.run(main(sys.argv[1]))
"""


def test_the_wheel_serves_the_bundled_store_to_a_client_without_torch(
    installed: Installed, served: dict[str, int], store_dir: Path, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{served['port']}"
    site = _run([installed.server / "bin" / "python", "-c",
                 "import service, sysconfig; print(service.__file__);"
                 "print(sysconfig.get_paths()['purelib'])"], cwd=store_dir)  # fmt: skip
    module, purelib = site.split()
    assert Path(module).is_relative_to(installed.server), module  # the wheel, not the repo

    url = f"http://127.0.0.1:{served['metrics_port']}/readyz"
    with urllib.request.urlopen(url, timeout=10) as reply:  # models loaded before the port file
        assert reply.status == 200

    client_python = installed.client / "bin" / "python"
    missing = subprocess.run(
        [str(client_python), "-c", "import torch"], cwd=store_dir, env=_clean_env(),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    out = _run([client_python, "-c", CLIENT_SCRIPT, target], cwd=store_dir).splitlines()
    assert out == ["['bytes-lstm', 'co2-gru'] 15 5", "False"], out

    client_cli = installed.client / "bin" / "seqserve"
    assert _run([client_cli, "--version"], cwd=store_dir).split()[-1] == "0.1.0"
    generated = _run(
        [client_cli, "generate", "--target", target, "--model", "bytes-lstm",
         "--prompt", "The ", "--max-tokens", "12", "--seed", "3"],
        cwd=store_dir,
    )  # fmt: skip
    assert len(generated.strip()) > 0, generated

    # State went to the data directory; nothing was written into the installed package.
    assert (tmp_path / "data" / "spill").is_dir()
    for name in ("spill", "model_store"):
        assert not (Path(purelib) / name).exists(), f"{name} created in site-packages"


def test_serve_without_a_store_here_refuses_in_one_line(
    installed: Installed, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [str(installed.server / "bin" / "seqserve"), "serve", "--port", "0",
         "--metrics-port", "-1", "--http-port", "-1"],
        cwd=empty, env=_clean_env(SEQSERVE_DATA_DIR=str(tmp_path / "data")),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--store" in lines[0] and "SEQSERVE_MODEL_STORE" in lines[0], lines[0]
    assert str(empty / "model_store") in lines[0], lines[0]

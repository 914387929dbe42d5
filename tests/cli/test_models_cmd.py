"""`seqserve models list|show|verify|alias|import` against a store in tmp_path."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from service.cli.main import main
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config(input_kind: str) -> ModelConfig:
    tokens = input_kind == "tokens"
    return ModelConfig(
        cell="lstm" if tokens else "gru",
        num_layers=1,
        hidden_size=8,
        input_kind="tokens" if tokens else "features",
        input_dim=256 if tokens else 3,
        embed_dim=4,
        head_kind="classification" if tokens else "regression",
        output_dim=256 if tokens else 2,
    )


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """bytes-lstm versions 1 and 2 (production → 1); co2-gru version 1."""
    store = ModelStore(tmp_path / "store")
    for name, kind, seeds in (("bytes-lstm", "tokens", (0, 1)), ("co2-gru", "features", (2,))):
        for seed in seeds:
            torch.manual_seed(seed)
            store.publish(
                name,
                _config(kind),
                SequenceModel(_config(kind)).state_dict(),
                description=f"{name} seed {seed}",
                training=Training(data="random", steps=0, validation={"mae": 0.5}),
            )
    store.set_alias("bytes-lstm", "production", 1)
    return store


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_table(store: ModelStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "models", "list", "--store", str(store.root))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["MODEL", "ARCHITECTURE", "VERSIONS", "LATEST", "ALIASES"]
    assert rows[0].startswith("bytes-lstm") and "1, 2" in rows[0] and "production→1" in rows[0]
    assert rows[1].startswith("co2-gru") and "frames of 3" in rows[1]


def test_list_json(store: ModelStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "models", "list", "--json", "--store", str(store.root))
    assert code == 0
    models = {m["name"]: m for m in json.loads(out)}
    assert models["bytes-lstm"]["aliases"] == {"production": 1}
    assert models["bytes-lstm"]["latest"] == 2
    assert [v["status"] for v in models["co2-gru"]["versions"]] == ["ok"]


def test_list_json_says_what_the_table_says_of_weights_that_fail_their_digest(
    store: ModelStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json read the manifests alone: a version failing its digest was "ok" and latest, while
    the table (the server's rule, which hashes) and `verify` said otherwise."""
    for version in ("2", "1"):
        path = store.root / "bytes-lstm" / version / "weights.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        code, out, _ = _run(capsys, "models", "list", "--store", str(store.root))
        assert code == 0
        row = next(r.split("  ") for r in out.splitlines() if r.startswith("bytes-lstm"))
        table_latest = [c.strip() for c in row if c.strip()][3]
        code, out, _ = _run(capsys, "models", "list", "--json", "--store", str(store.root))
        assert code == 0
        model = {m["name"]: m for m in json.loads(out)}["bytes-lstm"]
        expected = 1 if version == "2" else None
        assert table_latest == ("-" if expected is None else str(expected))
        assert model["latest"] == expected
        status = {v["version"]: v["status"] for v in model["versions"]}
        assert "sha256 mismatch" in status[int(version)]
        assert status[int(version)] in model["problems"]
    code, out, _ = _run(capsys, "models", "show", "co2-gru", "--json", "--store", str(store.root))
    assert code == 0
    assert json.loads(out)["latest"] == 1


def _damage(store: ModelStore, name: str, version: int) -> Path:
    path = store.root / name / str(version) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_list_lists_the_versions_a_server_lists_and_says_why_once(store: ModelStore) -> None:
    """VERSIONS is what ListModels lists: a version whose weights fail their digest is left out
    (the table listed it, beside a LATEST that skipped it) and said to be refused, on stderr
    once, with no bare log line from the rule beside it. In a process of its own: the log line
    went to Python's last-resort handler, which pytest's own logging hides."""
    damaged = _damage(store, "bytes-lstm", 2)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "models", "list", "--store", str(store.root)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = next(r for r in done.stdout.splitlines() if r.startswith("bytes-lstm"))
    assert [c.strip() for c in row.split("  ") if c.strip()][2:4] == ["1", "1"], row
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"refused: {damaged}: sha256 mismatch"), lines


def test_list_reports_refused_versions(store: ModelStore, capsys) -> None:
    manifest = store.root / "co2-gru" / "1" / "manifest.json"
    manifest.write_text("{}")
    code, _, err = _run(capsys, "models", "list", "--store", str(store.root))
    assert code == 0
    assert f"refused: {manifest}: invalid manifest" in err


@pytest.mark.parametrize("action", ["list", "verify"])
def test_a_store_that_is_a_file_exits_1_with_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    root = tmp_path / "store"
    root.write_text("not a folder")
    code, out, err = _run(capsys, "models", action, "--store", str(root))
    assert code == 1
    assert out == ""
    assert err == f"error: the model store {root} is not a readable folder: Not a directory\n"


def test_store_defaults_to_the_setting(
    store: ModelStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQSERVE_MODEL_STORE", str(store.root))
    code, out, _ = _run(capsys, "models", "list")
    assert code == 0 and "bytes-lstm" in out


@pytest.mark.parametrize("action", [["list"], ["verify"], ["show", "bytes-lstm"]])
def test_a_bad_environment_variable_is_named_as_serve_names_it(
    store: ModelStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    action: list[str],
) -> None:
    """Without --store the commands read the settings: an unrelated bad variable was
    `invalid environment: error parsing value for field "engine" from source …`."""
    monkeypatch.setenv("SEQSERVE_MODEL_STORE", str(store.root))
    monkeypatch.setenv("SEQSERVE_ENGINE__PRELOAD", "bytes-lstm")
    code, out, err = _run(capsys, "models", *action)
    assert (code, out) == (2, "")
    assert err == (
        "seqserve: invalid environment: SEQSERVE_ENGINE__PRELOAD='bytes-lstm': engine.preload "
        "takes a JSON list in the environment, e.g. SEQSERVE_ENGINE__PRELOAD='[\"bytes-lstm\"]'\n"
    )
    code, out, err = _run(capsys, "config", "show")
    assert code == 2 and out == "" and "SEQSERVE_ENGINE__PRELOAD='bytes-lstm'" in err


def test_show_resolves_production_and_prints_fingerprint(
    store: ModelStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "models", "show", "bytes-lstm", "--store", str(store.root))
    assert code == 0
    fingerprint = store.load("bytes-lstm", 1).fingerprint
    assert out.splitlines()[0] == f"bytes-lstm version 1    fingerprint {fingerprint}"
    assert "bytes-lstm seed 0" in out  # the description
    assert "1 *" in out and "production" in out


def test_show_json_of_a_version(store: ModelStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "models", "show", "co2-gru", "--version", "1", "--json", "--store", str(store.root)
    )
    assert code == 0
    body = json.loads(out)
    assert body["version"] == 1
    assert body["fingerprint"] == store.load("co2-gru", 1).fingerprint
    assert body["manifest"]["training"]["validation"] == {"mae": 0.5}
    assert body["manifest"]["input"] == {"kind": "features", "dim": 3, "embed_dim": 4}


def test_show_says_which_versions_fail_their_digest(
    store: ModelStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """The versions table of `models show` read the manifests alone: a version whose weights
    fail their digest showed its description, as one that serves."""
    path = store.root / "bytes-lstm" / "2" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, _ = _run(capsys, "models", "show", "bytes-lstm", "--store", str(store.root))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line[:1].isdigit()}
    assert "sha256 mismatch" in rows["2"], out
    assert "sha256 mismatch" not in rows["1"] and "bytes-lstm seed 0" in rows["1"], out


@pytest.mark.parametrize("spec", ["latest", ""])
def test_show_picks_the_version_a_new_session_gets(
    store: ModelStore, capsys: pytest.CaptureFixture[str], spec: str
) -> None:
    """The newest version failing its digest: `latest` (and "" without a production alias) is
    the next older one, as on a server; show picked the failing one by its manifest alone, and
    its JSON said `version` 2 beside `latest` 1."""
    store.delete_alias("bytes-lstm", "production")
    _damage(store, "bytes-lstm", 2)
    argv = ("models", "show", "bytes-lstm", "--version", spec, "--store", str(store.root))
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert out.splitlines()[0].startswith("bytes-lstm version 1 "), out
    assert "1 *" in out and "2 *" not in out
    code, out, _ = _run(capsys, *argv, "--json")
    body = json.loads(out)
    assert body["version"] == body["latest"] == body["manifest"]["version"] == 1
    _damage(store, "bytes-lstm", 1)  # every version refused: shown, each with why
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and out.count("sha256 mismatch") == 2, out


def test_show_unknown_model(store: ModelStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "models", "show", "nope", "--store", str(store.root))
    assert code == 1
    assert "model 'nope' not found; available: bytes-lstm, co2-gru" in err


def test_verify_clean_store(store: ModelStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "models", "verify", "--store", str(store.root))
    assert code == 0
    assert "3 of 3 versions ok" in out
    assert err == ""


def test_verify_names_each_bad_file_and_fails(
    store: ModelStore, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = [store.root / "bytes-lstm" / v / "weights.safetensors" for v in ("1", "2")]
    for path in bad:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    code, out, err = _run(capsys, "models", "verify", "--store", str(store.root))
    assert code == 1
    assert "1 of 3 versions ok" in out
    for path in bad:
        assert f"bad: {path}: " in err
    code, out, _ = _run(capsys, "models", "verify", "--json", "--store", str(store.root))
    assert code == 1
    assert {(r["model"], r["version"]) for r in json.loads(out) if not r["ok"]} == {
        ("bytes-lstm", 1),
        ("bytes-lstm", 2),
    }


@pytest.mark.parametrize(
    ("aliases", "said"),
    [('{"production": 9}', "alias 'production' points to version 9, which is missing"),
     ("not json", "unreadable")],
)  # fmt: skip
def test_verify_fails_on_aliases_that_would_refuse_new_sessions(
    store: ModelStore, capsys: pytest.CaptureFixture[str], aliases: str, said: str
) -> None:
    """Every version's weights are fine, the aliases are not: the server would refuse every
    default session (it passed as "3 of 3 versions ok", exit 0)."""
    path = store.root / "bytes-lstm" / "aliases.json"
    path.write_text(aliases)
    code, out, err = _run(capsys, "models", "verify", "--store", str(store.root))
    assert code == 1
    assert "3 of 3 versions ok" in out and "1 alias problem(s)" in out
    (line,) = err.strip().splitlines()
    assert line.startswith(f"bad: {path}: ") and said in line
    assert line.count(str(path)) == 1, line  # the path once
    code, out, _ = _run(capsys, "models", "verify", "--json", "--store", str(store.root))
    assert code == 1
    assert [r["model"] for r in json.loads(out) if not r["ok"]] == ["bytes-lstm"]


def test_alias_set_and_delete(store: ModelStore, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(store.root)
    assert _run(capsys, "models", "alias", "bytes-lstm", "staging", "2", "--store", root)[0] == 0
    assert dict(store.model("bytes-lstm").aliases) == {"production": 1, "staging": 2}
    code, out, _ = _run(
        capsys, "models", "alias", "--delete", "bytes-lstm", "staging", "--store", root
    )
    assert code == 0 and "deleted" in out
    assert dict(store.model("bytes-lstm").aliases) == {"production": 1}


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["bytes-lstm", "staging"], 2, "usage: models alias NAME ALIAS VERSION"),
        (["bytes-lstm", "latest", "1"], 2, "alias 'latest' is reserved"),
        (["bytes-lstm", "staging", "9"], 1, "version 9 of 'bytes-lstm' not found; versions: 1, 2"),
        (["--delete", "bytes-lstm", "canary"], 1, "alias 'canary' of 'bytes-lstm' not found"),
        (["--delete", "bytes-lstm", "Bad"], 2, "invalid alias 'Bad': use a lowercase letter"),
    ],
)
def test_alias_errors(
    store: ModelStore, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    got, _, err = _run(capsys, "models", "alias", *argv, "--store", str(store.root))
    assert got == code
    assert message in err
    assert dict(store.model("bytes-lstm").aliases) == {"production": 1}


def test_alias_on_a_read_only_store_exits_1_with_an_error(
    store: ModelStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.open

    def read_only(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        # A read-only mount cannot be made in a test: refuse writes where the store opens files.
        if self.is_relative_to(store.root) and any(m in mode for m in "wax"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    for argv in (["bytes-lstm", "staging", "2"], ["--delete", "bytes-lstm", "production"]):
        code, _, err = _run(capsys, "models", "alias", *argv, "--store", str(store.root))
        assert code == 1
        assert err == (
            "error: cannot change the aliases of 'bytes-lstm': the model store cannot be "
            "written (Read-only file system)\n"
        )
    assert dict(store.model("bytes-lstm").aliases) == {"production": 1}


def test_import_a_torch_gru_checkpoint(
    store: ModelStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    torch.manual_seed(5)
    proj, gru, out = nn.Linear(3, 4), nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)
    state = {
        **{f"encoder.{k}": v for k, v in gru.state_dict().items()},
        "inp.weight": proj.weight,
        "inp.bias": proj.bias,
        "out.weight": out.weight,
        "out.bias": out.bias,
    }
    ckpt = tmp_path / "gru.pt"
    torch.save(state, ckpt)
    code, stdout, err = _run(
        capsys,
        "models", "import", "co2-gru", str(ckpt),
        "--rename-prefix", "inp.=input_proj.", "--rename-prefix", "out.=head.",
        "--data", "co2 readings", "--alias", "production",
        "--store", str(store.root),
    )  # fmt: skip
    assert code == 0, err
    assert "published co2-gru version 2" in stdout
    entry = store.model("co2-gru")
    assert dict(entry.aliases) == {"production": 2}
    manifest = store.load("co2-gru", 2).manifest
    assert manifest.training.data == "co2 readings"
    assert manifest.input.kind == "features"


def test_import_bad_checkpoint_exits_2(
    store: ModelStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ckpt = tmp_path / "lstm.pt"
    torch.save(nn.LSTM(4, 8).state_dict(), ckpt)
    code, _, err = _run(capsys, "models", "import", "x", str(ckpt), "--store", str(store.root))
    assert code == 2
    assert "no input layer" in err
    assert "x" not in store.snapshot().models


@pytest.mark.parametrize(
    ("alias", "message"), [("latest", "is reserved"), ("Prod", "invalid alias 'Prod'")]
)
def test_import_with_a_bad_alias_exits_2_and_publishes_nothing(
    store: ModelStore, capsys: pytest.CaptureFixture[str], tmp_path: Path, alias: str, message: str
) -> None:
    ckpt = tmp_path / "co2.pt"
    torch.save(store.load("co2-gru", 1).model.state_dict(), ckpt)
    code, _, err = _run(
        capsys, "models", "import", "co2-gru", str(ckpt), "--alias", alias,
        "--store", str(store.root),
    )  # fmt: skip
    assert code == 2
    assert message in err
    assert store.model("co2-gru").usable_versions == (1,)


def test_import_with_negative_steps_exits_2_with_one_line_and_publishes_nothing(
    store: ModelStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`--steps -5` was a pydantic ValidationError traceback from the manifest's Training."""
    ckpt = tmp_path / "co2.pt"
    torch.save(store.load("co2-gru", 1).model.state_dict(), ckpt)
    code, out, err = _run(
        capsys, "models", "import", "co2-gru", str(ckpt), "--steps", "-5",
        "--store", str(store.root),
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert err == "error: --steps must be >= 0, got -5\n"
    assert store.model("co2-gru").usable_versions == (1,)


@pytest.mark.parametrize("action", [["verify"], ["list"], ["list", "--json"]])
def test_a_store_that_does_not_exist_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    """A mistyped --store in CI must not pass as "0 of 0 versions ok" (verify), nor as
    "no models in …" or `[]` with status 0 (list, which did)."""
    missing = tmp_path / "no-such-store"
    code, out, err = _run(capsys, "models", *action, "--store", str(missing))
    assert (code, out) == (1, "")
    assert err == f"error: the model store {missing} does not exist\n"


def test_import_into_a_store_that_is_a_file_exits_1_with_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    root.write_text("not a folder")
    ckpt = tmp_path / "gru.pt"
    torch.save(
        {
            **{f"encoder.{k}": v for k, v in nn.GRU(4, 8, batch_first=True).state_dict().items()},
            "input_proj.weight": torch.zeros(4, 3),
            "input_proj.bias": torch.zeros(4),
            "head.weight": torch.zeros(2, 8),
            "head.bias": torch.zeros(2),
        },
        ckpt,
    )
    code, out, err = _run(capsys, "models", "import", "co2", str(ckpt), "--store", str(root))
    assert (code, out) == (1, "")
    assert err.startswith("error: cannot publish 'co2': the model store cannot be written (")

"""`seqserve auth add-token` and the tokens file it appends to, on real files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from service.cli.main import main
from service.errors import InvalidArgument
from service.security.principal import Principal
from service.security.tokens import TokenFile, add_token


def _add(path: Path, principal: str, capsys: pytest.CaptureFixture[str]) -> str:
    """A token made by the real command, as it prints it."""
    assert main(["auth", "add-token", "--file", str(path), "--principal", principal]) == 0
    return capsys.readouterr().out.strip()


def test_a_new_file_is_private_and_every_token_it_gets_is_good(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens"
    alice, bob = _add(path, "alice", capsys), _add(path, "bob", capsys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tokens = TokenFile(path)
    assert tokens.authenticate(alice) == Principal("alice", "client")
    assert tokens.authenticate(bob) == Principal("bob", "client")


@pytest.mark.parametrize("tail", ["", "# alice's laptop", "\r\n"])
def test_a_token_is_added_on_a_line_of_its_own_after_a_hand_edit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tail: str
) -> None:
    """An editor or `printf '%s'` can leave the last line without its newline: the new line
    must not be glued onto it (both tokens would be lost, and the file refused)."""
    path = tmp_path / "tokens"
    alice = _add(path, "alice", capsys)
    path.write_bytes(path.read_bytes().rstrip(b"\n") + tail.encode())
    bob = _add(path, "bob", capsys)
    tokens = TokenFile(path)  # raises on a malformed line
    assert tokens.authenticate(alice) == Principal("alice", "client")
    assert tokens.authenticate(bob) == Principal("bob", "client")


def test_an_empty_file_gets_no_blank_first_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.touch()
    add_token(path, "carol", "admin")
    assert path.read_text().splitlines()[0].startswith("carol admin ")


def test_the_generation_moves_only_when_the_entries_change(tmp_path: Path) -> None:
    """What an open Stream compares to know whether to authenticate again."""
    path = tmp_path / "tokens"
    add_token(path, "alice", "client")
    tokens = TokenFile(path)
    start = tokens.generation
    path.write_text(path.read_text() + "# a comment\n")
    tokens.reload()
    assert tokens.generation == start  # nothing revoked: nothing to check again
    bob = add_token(path, "bob", "client")
    tokens.reload()
    assert tokens.generation == start + 1
    path.unlink()
    tokens.reload()
    assert tokens.generation == start + 2
    assert tokens.authenticate(bob) is None


def test_a_file_that_is_not_utf8_is_malformed(tmp_path: Path) -> None:
    """Refused at start with a clear error; rewritten so later, the last good entries stay."""
    path = tmp_path / "tokens"
    path.write_bytes(b"alice client \xff\xfe\n")
    with pytest.raises(InvalidArgument, match="not UTF-8 text"):
        TokenFile(path)
    alice = add_token(path := tmp_path / "good", "alice", "client")
    tokens = TokenFile(path)
    path.write_bytes(b"\xff" * 10)
    tokens.reload()
    assert tokens.authenticate(alice) == Principal("alice", "client")


def test_revoke_lines_name_certificates_beside_the_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens"
    alice = _add(path, "alice", capsys)
    with path.open("a") as f:
        f.write("revoke cert:bob\nrevoke   cert:Carol Smith  # left the team\n")
    tokens = TokenFile(path)
    assert tokens.revoked("cert:bob") and tokens.revoked("cert:Carol Smith")
    assert not tokens.revoked("cert:alice") and not tokens.revoked("bob")
    assert tokens.authenticate(alice) == Principal("alice", "client")  # tokens as before
    generation = tokens.generation
    path.write_text(path.read_text().replace("revoke cert:bob\n", ""))
    tokens.reload()
    assert not tokens.revoked("cert:bob") and tokens.generation == generation + 1


@pytest.mark.parametrize(
    "line", ["revoke bob", "revoke cert:", "revoke cert:a/b", "revoke", "revoke cert:" + "x" * 65]
)
def test_a_revoke_line_that_names_no_certificate_is_malformed(tmp_path: Path, line: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    with pytest.raises(InvalidArgument, match="line 1: expected 'revoke cert:<common name>'"):
        TokenFile(path)


def test_a_principal_named_revoke_has_a_token_like_any_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`add-token --principal revoke` wrote a line the parser took for a malformed revocation:
    the server refused to start, and a live reload kept the old file for good."""
    path = tmp_path / "tokens"
    token = _add(path, "revoke", capsys)
    with path.open("a") as f:
        f.write("revoke\tcert:bob\n")  # a tab between the words, as token lines may have
    tokens = TokenFile(path)
    assert tokens.authenticate(token) == Principal("revoke", "client")
    assert tokens.revoked("cert:bob")


def test_a_tokens_file_that_disappears_keeps_its_certificates_revoked(tmp_path: Path) -> None:
    """Fail closed: its tokens are refused (as before), and the certificates it revoked are
    not let back in."""
    path = tmp_path / "tokens"
    path.write_text("revoke cert:alice\n")
    tokens = TokenFile(path)
    assert tokens.revoked("cert:alice")
    path.unlink()
    tokens.reload()
    assert tokens.revoked("cert:alice")


def test_a_tokens_file_that_disappears_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kept revocations made every later look (once a second) log the loss again."""
    path = tmp_path / "tokens"
    path.write_text("revoke cert:alice\n")
    tokens = TokenFile(path)
    path.unlink()
    for _ in range(3):
        tokens.reload()
    assert sum("cannot be read" in r.getMessage() for r in caplog.records) == 1

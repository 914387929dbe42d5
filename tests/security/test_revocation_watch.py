"""`RevocationWatch` on its own, over a real tokens file: it ends the calls whose token is
revoked (once each), leaves the others, and runs only while there are calls to watch. (Over
real gRPC: tests/api/test_security_revocation.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.security import tokens as tokens_module
from service.security.call_auth import CallAuth, Grant
from service.security.revocation_watch import RevocationWatch
from service.security.tokens import TokenFile, add_token
from tests.polling import until

from .test_call_auth import METHOD, Context

EVERY_S = 0.01


@pytest.fixture(autouse=True)
def reread_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "_CHECK_EVERY_S", 0.0)


class Ends:
    """Each call's `end`, counting how often it was called; `gone` answers as a call that
    had ended by itself already."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def of(self, name: str, gone: bool = False):  # type: ignore[no-untyped-def]
        async def end() -> bool:
            self.calls[name] = self.calls.get(name, 0) + 1
            return not gone

        return end


class Bob:
    """One principal's tokens file, its `CallAuth`, a watch over it, and its calls' grants."""

    def __init__(self, tmp_path: Path, every_s: float = EVERY_S) -> None:
        self.path = tmp_path / "tokens"
        token = add_token(self.path, "bob", "client")
        self.tokens = TokenFile(self.path)
        self.auth = CallAuth(self.tokens, client_certificates=False)
        self.watch = RevocationWatch(self.tokens, every_s=every_s)
        self.context = Context(authorization=f"Bearer {token}")

    def grant(self) -> Grant:
        """A new call's grant."""
        grant = self.auth.grant(METHOD, self.context, self.auth.principal(METHOD, self.context))
        assert grant is not None
        return grant

    def revoke(self) -> None:
        self.path.write_text("")


async def _settle(watch: RevocationWatch) -> None:
    await until(
        lambda: watch._task is None,
        100 * EVERY_S,
        "the watch to stop with nothing to watch",
        interval=EVERY_S,
    )


async def test_revoked_calls_end_once_and_the_others_go_on(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    made = {name: add_token(path, name, "client") for name in ("alice", "bob")}
    tokens = TokenFile(path)
    auth = CallAuth(tokens, client_certificates=False)
    watch = RevocationWatch(tokens, every_s=EVERY_S)
    ends = Ends()
    grants = {}
    for name, owner, gone in (
        ("alice", "alice", False),
        ("bob", "bob", False),
        ("bob2", "bob", True),
    ):
        context = Context(authorization=f"Bearer {made[owner]}")
        who = auth.principal(METHOD, context)
        grants[name] = auth.grant(METHOD, context, who)
        watch.watch(grants[name], ends.of(name, gone))
    await asyncio.sleep(EVERY_S * 5)
    assert ends.calls == {} and len(watch) == 3  # nothing changed: nothing ended

    path.write_text("".join(r + "\n" for r in path.read_text().splitlines() if "bob" not in r))
    for _ in range(100):
        await asyncio.sleep(EVERY_S)
        if len(watch) == 1:
            break
    await asyncio.sleep(EVERY_S * 5)
    assert ends.calls == {"bob": 1, "bob2": 1}  # each once, alice's call never
    assert watch.ended == 1  # bob2's had ended by itself
    assert len(watch) == 1

    watch.unwatch(grants["alice"])
    await _settle(watch)
    watch.watch(grants["alice"], ends.of("alice"))  # a new call: the watch starts again
    assert watch._task is not None
    watch.unwatch(grants["alice"])
    await _settle(watch)
    assert ends.calls == {"bob": 1, "bob2": 1}


async def test_an_end_that_fails_is_not_counted_and_the_watch_goes_on(tmp_path: Path) -> None:
    """A call whose client went away as it was ended (its abort raised): not counted, and
    the other revoked calls are still ended."""
    bob = Bob(tmp_path)

    async def fails() -> bool:
        raise RuntimeError("the call had finished")

    ends = Ends()
    bob.watch.watch(bob.grant(), fails)
    bob.watch.watch(bob.grant(), ends.of("second"))
    bob.revoke()
    await _settle(bob.watch)
    assert ends.calls == {"second": 1} and bob.watch.ended == 1 and len(bob.watch) == 0


async def test_closing_stops_the_watch(tmp_path: Path) -> None:
    bob = Bob(tmp_path, every_s=3600.0)
    watch = bob.watch
    watch.watch(bob.grant(), Ends().of("bob"))
    task = watch._task
    assert task is not None and not task.done()
    await watch.close()
    assert task.cancelled() and watch._task is None and len(watch) == 0


async def test_a_call_whose_end_hangs_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """An abort waits until its status is sent (a client that reads nothing holds it up):
    the other revoked calls are ended all the same, and closing cancels the hung ending."""
    bob = Bob(tmp_path)
    watch = bob.watch
    hung = asyncio.Event()

    async def hangs() -> bool:
        hung.set()
        await asyncio.Event().wait()  # never
        return True

    ends = Ends()
    watch.watch(bob.grant(), hangs)
    watch.watch(bob.grant(), ends.of("second"))
    bob.revoke()
    await _settle(watch)
    assert hung.is_set() and ends.calls == {"second": 1} and watch.ended == 1
    await watch.close()  # the hung ending is cancelled, not left behind
    assert not watch._ending


async def test_an_ended_call_fails_its_checks_even_with_its_token_back(tmp_path: Path) -> None:
    """Ended by the watch, a call's own next check must fail though the token was restored
    meanwhile: its client has its status, the handler must not go on."""
    bob = Bob(tmp_path)
    before = bob.path.read_text()
    grant = bob.grant()
    bob.watch.watch(grant, Ends().of("bob"))
    bob.revoke()
    await _settle(bob.watch)
    bob.path.write_text(before)
    assert bob.auth.principal(METHOD, bob.context) is not None  # the token is good again
    assert grant.revoked()


async def test_a_pass_that_fails_does_not_stop_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = Bob(tmp_path)
    grant = bob.grant()
    failures = [RuntimeError("a disk error"), RuntimeError("again")]
    refresh = bob.tokens.refresh

    def flaky() -> int:
        if failures:
            raise failures.pop()
        return refresh()

    monkeypatch.setattr(bob.tokens, "refresh", flaky)
    ends = Ends()
    bob.watch.watch(grant, ends.of("bob"))
    await until(
        lambda: not failures,
        100 * EVERY_S,
        "the watch to go on looking after a failed pass (its failures used up)",
        interval=EVERY_S,
    )
    bob.revoke()
    await _settle(bob.watch)
    assert ends.calls == {"bob": 1}

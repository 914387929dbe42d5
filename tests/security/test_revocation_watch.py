"""`RevocationWatch` on its own, over a real tokens file: it ends the calls whose token is
revoked (once each), leaves the others, and runs only while there are calls to watch. (Over
real gRPC: tests/api/test_security_revocation.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.security import tokens as tokens_module
from service.security.call_auth import CallAuth
from service.security.revocation_watch import RevocationWatch
from service.security.tokens import TokenFile, add_token

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


async def _settle(watch: RevocationWatch) -> None:
    for _ in range(100):
        await asyncio.sleep(EVERY_S)
        if watch._task is None:
            return
    raise AssertionError("the watch is still running with nothing to watch")


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
    path = tmp_path / "tokens"
    token = add_token(path, "bob", "client")
    tokens = TokenFile(path)
    auth = CallAuth(tokens, client_certificates=False)
    watch = RevocationWatch(tokens, every_s=EVERY_S)
    context = Context(authorization=f"Bearer {token}")
    who = auth.principal(METHOD, context)

    async def fails() -> bool:
        raise RuntimeError("the call had finished")

    ends = Ends()
    first, second = auth.grant(METHOD, context, who), auth.grant(METHOD, context, who)
    assert first is not None and second is not None
    watch.watch(first, fails)
    watch.watch(second, ends.of("second"))
    path.write_text("")
    await _settle(watch)
    assert ends.calls == {"second": 1} and watch.ended == 1 and len(watch) == 0


async def test_closing_stops_the_watch(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = add_token(path, "bob", "client")
    tokens = TokenFile(path)
    auth = CallAuth(tokens, client_certificates=False)
    watch = RevocationWatch(tokens, every_s=3600.0)
    context = Context(authorization=f"Bearer {token}")
    grant = auth.grant(METHOD, context, auth.principal(METHOD, context))
    assert grant is not None
    watch.watch(grant, Ends().of("bob"))
    task = watch._task
    assert task is not None and not task.done()
    await watch.close()
    assert task.cancelled() and watch._task is None and len(watch) == 0


async def test_a_call_whose_end_hangs_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """An abort waits until its status is sent (a client that reads nothing holds it up):
    the other revoked calls are ended all the same, and closing cancels the hung ending."""
    path = tmp_path / "tokens"
    token = add_token(path, "bob", "client")
    tokens = TokenFile(path)
    auth = CallAuth(tokens, client_certificates=False)
    watch = RevocationWatch(tokens, every_s=EVERY_S)
    context = Context(authorization=f"Bearer {token}")
    who = auth.principal(METHOD, context)
    hung = asyncio.Event()

    async def hangs() -> bool:
        hung.set()
        await asyncio.Event().wait()  # never
        return True

    ends = Ends()
    first, second = auth.grant(METHOD, context, who), auth.grant(METHOD, context, who)
    assert first is not None and second is not None
    watch.watch(first, hangs)
    watch.watch(second, ends.of("second"))
    path.write_text("")
    await _settle(watch)
    assert hung.is_set() and ends.calls == {"second": 1} and watch.ended == 1
    await watch.close()  # the hung ending is cancelled, not left behind
    assert not watch._ending


async def test_an_ended_call_fails_its_checks_even_with_its_token_back(tmp_path: Path) -> None:
    """Ended by the watch, a call's own next check must fail though the token was restored
    meanwhile: its client has its status, the handler must not go on."""
    path = tmp_path / "tokens"
    token = add_token(path, "bob", "client")
    before = path.read_text()
    tokens = TokenFile(path)
    auth = CallAuth(tokens, client_certificates=False)
    watch = RevocationWatch(tokens, every_s=EVERY_S)
    context = Context(authorization=f"Bearer {token}")
    grant = auth.grant(METHOD, context, auth.principal(METHOD, context))
    assert grant is not None
    watch.watch(grant, Ends().of("bob"))
    path.write_text("")
    await _settle(watch)
    path.write_text(before)
    assert auth.principal(METHOD, context) is not None  # the token is good again
    assert grant.revoked()


async def test_a_pass_that_fails_does_not_stop_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens"
    token = add_token(path, "bob", "client")
    tokens = TokenFile(path)
    auth = CallAuth(tokens, client_certificates=False)
    watch = RevocationWatch(tokens, every_s=EVERY_S)
    context = Context(authorization=f"Bearer {token}")
    grant = auth.grant(METHOD, context, auth.principal(METHOD, context))
    assert grant is not None
    failures = [RuntimeError("a disk error"), RuntimeError("again")]
    refresh = tokens.refresh

    def flaky() -> int:
        if failures:
            raise failures.pop()
        return refresh()

    monkeypatch.setattr(tokens, "refresh", flaky)
    ends = Ends()
    watch.watch(grant, ends.of("bob"))
    for _ in range(100):
        if not failures:
            break
        await asyncio.sleep(EVERY_S)
    assert not failures, "the watch stopped looking after a failed pass"
    path.write_text("")
    await _settle(watch)
    assert ends.calls == {"bob": 1}

"""tests/polling.py: `until` returns the condition's first truthy value, and on timeout fails
naming what it waited for."""

from __future__ import annotations

import pytest

from tests.polling import until, until_sync


class Countdown:
    """Falsy for its first `falsy` calls, then "ready"."""

    def __init__(self, falsy: int) -> None:
        self.falsy, self.calls = falsy, 0

    def __call__(self) -> str:
        self.calls += 1
        return "ready" if self.calls > self.falsy else ""


async def test_until_returns_the_first_truthy_value() -> None:
    countdown = Countdown(3)
    assert await until(countdown, 10, "the countdown", interval=0.001) == "ready"
    assert countdown.calls == 4  # three falsy tries, then the value, and no try after it


async def test_until_awaits_a_condition_that_returns_an_awaitable() -> None:
    countdown = Countdown(2)

    async def ready() -> str:
        return countdown()

    assert await until(ready, 10, "the countdown", interval=0.001) == "ready"
    assert countdown.calls == 3


async def test_until_names_what_it_waited_for_when_it_times_out() -> None:
    never = Countdown(10**9)
    with pytest.raises(AssertionError) as failed:
        await until(never, 0.05, "the frobnicator to settle", detail=lambda: "last: 7")
    message = str(failed.value)
    assert "the frobnicator to settle" in message and "0.05 s" in message
    assert message.endswith("\nlast: 7")
    assert never.calls >= 6  # at once, then after each of 0.05 / 0.01 sleeps at least


def test_until_sync_returns_the_first_truthy_value() -> None:
    countdown = Countdown(3)
    assert until_sync(countdown, 10, "the countdown", interval=0.001) == "ready"
    assert countdown.calls == 4


def test_until_sync_names_what_it_waited_for_when_it_times_out() -> None:
    never = Countdown(10**9)
    with pytest.raises(AssertionError, match=r"the port file to appear.*0\.05 s") as failed:
        until_sync(never, 0.05, "the port file to appear")
    assert never.calls >= 6
    assert "\n" not in str(failed.value)  # no detail asked for, none added

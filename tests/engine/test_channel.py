"""Channel: items in order to one consumer that may wait or be cancelled."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.channel import Channel


async def test_items_come_out_in_order_whether_put_before_or_while_waiting() -> None:
    channel: Channel[int] = Channel()
    channel.put_nowait(1)
    channel.put_nowait(2)
    assert channel.qsize() == 2
    assert [await channel.get(), await channel.get()] == [1, 2]
    waiting = asyncio.ensure_future(channel.get())
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing to take: it waits
    channel.put_nowait(3)
    channel.put_nowait(4)
    assert await asyncio.wait_for(waiting, 1) == 3
    assert not channel.empty() and channel.get_nowait() == 4
    assert channel.empty() and channel.qsize() == 0


async def test_a_cancelled_wait_loses_nothing_and_the_next_get_takes_it() -> None:
    channel: Channel[str] = Channel()
    waiting = asyncio.ensure_future(channel.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    channel.put_nowait("a")  # the cancelled waiter is not woken, and the item stays
    assert await asyncio.wait_for(channel.get(), 1) == "a"


async def test_a_put_and_a_cancel_in_the_same_tick_keep_the_item() -> None:
    channel: Channel[str] = Channel()
    waiting = asyncio.ensure_future(channel.get())
    await asyncio.sleep(0)
    channel.put_nowait("b")  # wakes the waiter...
    waiting.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert channel.qsize() == 1
    assert await asyncio.wait_for(channel.get(), 1) == "b"


async def test_on_drained_is_called_once_when_the_consumer_takes_the_last_item() -> None:
    """The step scheduler's window learns from it that a generation's consumer has taken
    every token it was given (`abandon` calls it too: a consumer that leaves takes nothing)."""
    channel: Channel[int] = Channel()
    calls: list[int] = []
    channel.put_nowait(1)
    channel.put_nowait(2)
    channel.on_drained = lambda: calls.append(channel.qsize())
    assert await channel.get() == 1
    assert calls == []  # one item still there
    assert channel.get_nowait() == 2
    assert calls == [0] and channel.on_drained is None  # called once, then cleared
    channel.put_nowait(3)
    assert await channel.get() == 3
    assert calls == [0]

    channel.on_drained = lambda: calls.append(-1)
    waiting = asyncio.ensure_future(channel.get())  # an empty channel: the consumer waits
    await asyncio.sleep(0)
    assert calls == [0]  # waiting is not taking
    channel.put_nowait(4)
    assert await asyncio.wait_for(waiting, 1) == 4
    assert calls == [0, -1]

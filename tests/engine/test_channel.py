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

"""Ending a generation sent as events (`Routes._end`: a revoked token, a shutdown's grace period
over) ends only one still in its drainable part, where the cancel becomes its error event.

The revocation watch takes a revoked call's `end` and runs it in a task of its own, so the call
may finish in between. These drive `Routes` with a generation's own steps (a task in
`_drainable` and `_watched`) and a watch that hands over the `end` it was given."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from service.errors import Unauthenticated
from service.http.routes import Routes


class HeldWatch:
    """A revocation watch that keeps the `end` each call gives it, for the test to run."""

    def __init__(self) -> None:
        self.ends: list[Callable[[], Awaitable[bool]]] = []

    def watch(self, grant: object, end: Callable[[], Awaitable[bool]]) -> None:
        self.ends.append(end)

    def unwatch(self, grant: object) -> None:
        pass  # the real watch pops a revoked grant before its `end` runs: `unwatch` is too late


def _routes(watch: HeldWatch) -> Routes:
    return Routes(SimpleNamespace(revocations=watch), None, None)  # type: ignore[arg-type]


async def _generation(
    routes: Routes, generating: asyncio.Event, finishing: asyncio.Event, done: asyncio.Event
) -> str:
    """A generation's handler in outline: it generates in `_drainable` and `_watched`, then
    writes its body's end outside them (`response.write_eof`)."""
    task = asyncio.current_task()
    assert task is not None
    with routes._drainable(task), routes._watched(object(), task):  # type: ignore[arg-type]
        generating.set()
        await done.wait()
    finishing.set()
    await asyncio.sleep(0.05)  # its body's end being written
    return "finished"


async def test_a_revocation_seen_after_the_generation_finished_ends_nothing() -> None:
    """The watch saw the token revoked and took the call's `end`; the generation finished
    before `end` ran. Before, `end` cancelled the task as it wrote its body's end (the client
    got a cut body) and left it in `_ended` for good."""
    watch = HeldWatch()
    routes = _routes(watch)
    generating, finishing, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_generation(routes, generating, finishing, done))
    await generating.wait()
    (end,) = watch.ends  # taken by the watch: the token is revoked
    done.set()
    await finishing.wait()  # the generation finished meanwhile
    assert await end() is False
    assert routes._ended == {} and routes._streams == set()
    assert await asyncio.wait_for(task, 10) == "finished"


async def test_a_revocation_ends_a_generation_still_generating_with_its_error() -> None:
    watch = HeldWatch()
    routes = _routes(watch)
    generating, finishing, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_generation(routes, generating, finishing, done))
    await generating.wait()
    (end,) = watch.ends
    assert await end() is True
    assert await end() is False  # ending already
    with pytest.raises(Unauthenticated):
        await asyncio.wait_for(task, 10)
    assert routes._ended == {} and routes._streams == set()


async def test_a_shutdown_ends_only_generations_still_generating() -> None:
    routes = _routes(HeldWatch())
    events: list[Any] = [asyncio.Event() for _ in range(3)]
    finished = asyncio.create_task(_generation(routes, *events))
    await events[0].wait()
    events[2].set()
    await events[1].wait()  # writing its body's end
    still = [asyncio.Event() for _ in range(3)]
    generating = asyncio.create_task(_generation(routes, *still))
    await still[0].wait()
    routes.end_streams()
    assert await finished == "finished"
    with pytest.raises(Exception, match="draining"):
        await asyncio.wait_for(generating, 10)
    assert routes._ended == {} and routes._streams == set()

"""The HTTP API's requests, succeeding and refused, leave no reference cycle behind (as the gRPC
paths: tests/api/test_reference_cycles.py): what survives a collection is frozen, so a cycle
that dies later would be kept until the next thaw."""

from __future__ import annotations

import collections
import json

import aiohttp

from service.api.server import SeqServeServer
from tests.api.test_reference_cycles import _garbage, _kind
from tests.api.test_state_dir_faults import _break as break_journal


class _Looped:
    """A cycle made on purpose each round: the audit must find it."""

    def __init__(self) -> None:
        self.me = self


def _without_yarl_origins(garbage: list[object]) -> list[object]:
    """`garbage` less yarl's own cycle: an origin URL (`http://host:port`) caches itself as
    its `origin()` in its `_cache` dict, and yarl keeps URLs in an LRU; one evicted while the
    rounds run (made by an earlier test, for another server's port: seen after ~50 tests of
    this folder) is cyclic garbage that no code of ours made or holds."""
    own = [
        o
        for o in garbage
        if _kind(o) == "yarl.URL" and getattr(o, "_cache", {}).get("_origin") is o
    ]
    skip = {id(o) for o in own} | {id(o._cache) for o in own}  # type: ignore[attr-defined]
    return [o for o in garbage if id(o) not in skip]


async def test_http_requests_leave_no_reference_cycles(http: aiohttp.ClientSession) -> None:
    """Create with a prefix, step, generate (server-sent events), a step on an unknown session,
    one at the wrong position, a body that is not JSON, close: three rounds."""
    one = {"input": {"tokens": {"ids": [3]}}}
    statuses: list[int] = []

    async def call(method: str, path: str, **kwargs: object) -> bytes:
        async with http.request(method, path, **kwargs) as response:  # type: ignore[arg-type]
            statuses.append(response.status)
            return await response.read()

    async def rounds() -> None:
        made = await call("POST", "/v1/sessions", json={"model": "tok", "prefix": one["input"]})
        sid = json.loads(made)["session"]["sessionId"]
        await call("POST", f"/v1/sessions/{sid}:step", json=one)
        await call("POST", f"/v1/sessions/{sid}:generate", json={"sampling": {"maxTokens": 3}})
        await call("POST", "/v1/sessions/no-such-session:step", json=one)
        await call("POST", f"/v1/sessions/{sid}:step", json={**one, "expectedPosition": "99"})
        await call("POST", f"/v1/sessions/{sid}:step", data=b"{not json")
        await call("DELETE", f"/v1/sessions/{sid}")
        _Looped()

    await rounds()  # what loads once
    statuses.clear()
    garbage = await _garbage(rounds)
    assert statuses == [200, 200, 200, 404, 400, 400, 200] * 3
    kinds = collections.Counter(_kind(o) for o in _without_yarl_origins(garbage))
    looped = _kind(_Looped())
    assert kinds.pop(looped) == 3  # the audit sees cycles where there are some
    assert not kinds, kinds.most_common(20)


async def test_steps_the_journal_refuses_over_http_leave_no_reference_cycles(
    http: aiohttp.ClientSession, http_server: SeqServeServer
) -> None:
    """A step and a generation the journal refuses (503), three rounds, the journal broken
    before each."""
    journal = http_server.engine.durability.journal
    assert journal is not None
    one = {"input": {"tokens": {"ids": [3]}}}
    statuses: list[int] = []

    async def call(path: str, body: dict[str, object]) -> bytes:
        async with http.post(path, json=body) as response:
            statuses.append(response.status)
            return await response.read()

    made = await call("/v1/sessions", {"model": "tok", "prefix": one["input"]})
    sid = json.loads(made)["session"]["sessionId"]

    async def broken() -> None:
        await call(f"/v1/sessions/{sid}:step", one)  # opens the journal's next segment
        break_journal(journal)

    async def rounds() -> None:
        await broken()
        await call(f"/v1/sessions/{sid}:step", one)
        await broken()
        refused = await call(f"/v1/sessions/{sid}:generate", {"sampling": {"maxTokens": 2}})
        assert json.loads(refused)["error"]["status"] == "UNAVAILABLE"

    await rounds()  # what loads once
    statuses.clear()
    garbage = await _garbage(rounds)
    assert statuses == [200, 503, 200, 503] * 3
    kinds = collections.Counter(_kind(o) for o in garbage)
    assert not kinds, kinds.most_common(20)

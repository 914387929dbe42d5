"""The playground page in headless Chromium (Debian's, driven by Playwright; nothing downloads a
browser) against a server on the bundled model store: typing moves the bars, an edit other
than appending restarts the session, keystrokes never overlap, a generation streams in, a frame
model plots its predictions, and with tokens on the page asks for one; a switch mid-step, a
session closed under the page and a server restart each leave the page a working session, and
a step or create whose answer is lost is retried as the same request (applied once).
Screenshots go to `tests/http_api/screenshots/` (the README shows one)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from service.api.server import SeqServeServer
from service.security.tokens import add_token
from tests.api.conftest import ServerFactory

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_STORE = REPO_ROOT / "model_store"
SHOTS = Path(__file__).parent / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PHONE = {"width": 412, "height": 915}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: run `make system-deps`")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


async def _page(browser: Browser, server: SeqServeServer) -> Page:
    page = await browser.new_page(viewport=PHONE)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(f"http://127.0.0.1:{server.http_port}/")
    return page


async def _settled(page: Page) -> tuple[str, int]:
    """Wait until the session has consumed exactly the text box's text; (session id, position)."""
    await page.wait_for_function(
        """() => {
            const m = document.querySelector('#session-line').textContent
                .match(/session (\\S+) · position (\\d+)/);
            const bytes = new TextEncoder().encode(document.querySelector('#prompt').value).length;
            return m && Number(m[2]) === bytes && document.querySelectorAll('#bars .bar').length;
        }""",
        timeout=15_000,
    )
    line = await page.inner_text("#session-line")
    _, sid, _, _, position = line.split()
    return sid, int(position)


def _count(server: SeqServeServer, method: str, code: str) -> float:
    key = f'seqserve_rpc_duration_seconds_count{{code="{code}",method="{method}",protocol="http"}}'
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(key):
            return float(line.split()[-1])
    return 0.0


async def test_type_see_the_bars_move_and_generate(
    server_factory: ServerFactory, browser: Browser
) -> None:
    server = await server_factory(store_root=BUNDLED_STORE, server={"http_port": 0})
    page = await _page(browser, server)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    assert await page.input_value("#model") == "bytes-lstm"

    await page.type("#prompt", "def ", delay=5)  # faster than the server answers: coalesced
    first_id, position = await _settled(page)
    assert position == 4
    before = await page.inner_text("#bars")
    await page.type("#prompt", "main(", delay=5)
    same_id, position = await _settled(page)
    after = await page.inner_text("#bars")
    assert same_id == first_id and position == 9  # appended text: fed to the same session
    assert before != after and "%" in after

    await page.keyboard.press("Backspace")  # not an append: start again from the new text
    new_id, position = await _settled(page)
    assert new_id != first_id and position == 8
    # Keystrokes went in order, one request at a time: no call was refused for overlapping
    # (ABORTED) or for a position that moved under it (FAILED_PRECONDITION).
    assert _count(server, "Step", "OK") >= 1
    for code in ("ABORTED", "FAILED_PRECONDITION", "INVALID_ARGUMENT"):
        assert _count(server, "Step", code) == 0, code

    await page.fill("#max-tokens", "40")
    await page.click("#generate")
    await page.wait_for_function(
        "document.querySelector('#status').textContent.startsWith('done')", timeout=20_000
    )
    text = await page.input_value("#prompt")
    assert text.startswith("def main") and len(text) > len("def main")
    assert _count(server, "Generate", "OK") == 1
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0  # fits a phone's width
    await page.type("#prompt", " ")  # typing on after a generation continues the same session
    after_id, _ = await _settled(page)
    assert after_id == new_id
    SHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SHOTS / "playground.png"), full_page=True)
    assert not page.errors  # type: ignore[attr-defined]


async def test_a_frame_model_plots_its_predictions(
    server_factory: ServerFactory, browser: Browser
) -> None:
    server = await server_factory(store_root=BUNDLED_STORE, server={"http_port": 0})
    page = await _page(browser, server)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.select_option("#model", "co2-gru")
    await page.wait_for_selector("#frames-panel:not([hidden])")
    await page.click("#example")
    await page.wait_for_function(
        "document.querySelector('#status').textContent.includes('156 frames')", timeout=15_000
    )
    drawn = await page.evaluate(
        """() => { const c = document.querySelector('#plot');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let blue = 0;
                   for (let i = 0; i < d.length; i += 4) if (d[i+2] > 200 && d[i] < 80) blue++;
                   return blue; }"""
    )
    assert drawn > 200  # the prediction line is on the canvas
    await page.fill("#series", "1,2\n")
    await page.click("#predict")
    await page.wait_for_function(
        "document.querySelector('#status').className === 'error'", timeout=5_000
    )
    assert "expected 3 numbers" in await page.inner_text("#status")
    SHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SHOTS / "playground-frames.png"), full_page=True)
    # Every session the page made is closed: the token model's when the model changed, the
    # series' after its prediction.
    made = _count(server, "CreateSession", "OK")
    assert made >= 2 and _count(server, "CloseSession", "OK") == made


async def test_with_tokens_on_the_page_asks_for_one(
    server_factory: ServerFactory, browser: Browser, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    token = add_token(tokens, "alice", "client")
    server = await server_factory(
        store_root=BUNDLED_STORE, server={"http_port": 0}, security={"auth_tokens": tokens}
    )
    page = await _page(browser, server)
    await page.wait_for_selector("#auth:not([hidden])")
    await page.fill("#token", token)
    await page.click("#auth-form button")
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.type("#prompt", "ab")
    await _settled(page)
    assert await page.input_value("#token") == ""  # not left in the form
    stored = await page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    assert token not in stored and token not in await page.evaluate("document.cookie")


async def test_a_generation_holds_the_model_choice_until_stopped(
    server_factory: ServerFactory, browser: Browser
) -> None:
    """While a generation runs the model and version cannot change (a switch would leave it
    running on an orphaned session); Stop cancels it on the server, and a switch then closes
    the old session."""
    # A generation no host finishes before the Stop click lands: of a 2000-token one, 250-380
    # tokens had run by then here (the browser's round trips), too close on a faster host.
    # The page sends what the box holds (its `max` only mirrors the server's default limit).
    server = await server_factory(
        store_root=BUNDLED_STORE, server={"http_port": 0}, max_generate_tokens=10_000_000
    )
    page = await _page(browser, server)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.type("#prompt", "ab")
    old_id, _ = await _settled(page)
    await page.fill("#max-tokens", "10000000")
    await page.click("#generate")
    await page.wait_for_function("document.querySelector('#prompt').value.length > 2")
    assert await page.is_disabled("#version") and await page.is_disabled("#model")
    await page.click("#stop")
    await page.wait_for_function("!document.querySelector('#version').disabled")
    assert await page.inner_text("#status") == "stopped"
    await page.select_option("#version", "production")  # another choice: a new session
    await page.wait_for_function(
        f"!document.querySelector('#session-line').textContent.includes('{old_id}')"
    )
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        for _ in range(1_200):  # the page closes the old session (its DELETE waits out a 409)
            got = await http.get(f"/v1/sessions/{old_id}")
            if got.status != 200:
                break
            await asyncio.sleep(0.05)
        body = await got.json()
    assert got.status == 400 and body["error"]["status"] == "FAILED_PRECONDITION", body
    assert _count(server, "Generate", "CANCELLED") == 1  # cut short, not run to the end
    assert not page.errors  # type: ignore[attr-defined]


async def _outcome(page: Page, prefix: str) -> str:
    """Wait until the status says `prefix` or shows an error; the status."""
    await page.wait_for_function(
        """(prefix) => { const s = document.querySelector('#status');
                         return s.textContent.startsWith(prefix) || s.className === 'error'; }""",
        arg=prefix,
        timeout=20_000,
    )
    return await page.inner_text("#status")


async def _session_status(server: SeqServeServer, sid: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        got = await http.get(f"/v1/sessions/{sid}")
        return got.status, await got.json()


@pytest.mark.parametrize("switch", ["version", "model"])
async def test_a_switch_while_a_step_is_in_flight_goes_on_with_the_new_choice(
    server_factory: ServerFactory, browser: Browser, switch: str
) -> None:
    """The switch closes the old session under a step still on its way (held back here by
    Playwright's routing): that step's late answer is dropped and its pump stops, and the page
    goes on with the new choice at once, with no error and nothing left open: another version
    of the token model gets a new session for the text, the frame model none."""
    server = await server_factory(store_root=BUNDLED_STORE, server={"http_port": 0})
    page = await _page(browser, server)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.type("#prompt", "abc")
    old_id, _ = await _settled(page)
    held, switched = asyncio.Event(), asyncio.Event()

    async def slow(route: Route) -> None:
        held.set()
        # Until the page has switched: a fixed 0.6 s let a loaded host's stall end it first.
        await asyncio.wait_for(switched.wait(), 30)
        await route.continue_()

    await page.route("**/*:step", slow)
    async with page.expect_event(
        "requestfinished", lambda r: r.url.endswith(":step"), timeout=10_000
    ):
        await page.type("#prompt", "d")
        await asyncio.wait_for(held.wait(), 30)  # the step for "d" is on its way
        if switch == "version":
            await page.select_option("#version", "1")
        else:
            await page.select_option("#model", "co2-gru")
        switched.set()
    await page.unroute("**/*:step")
    await page.evaluate("new Promise((r) => setTimeout(r, 300))")  # the late answer is in
    if switch == "version":
        new_id, position = await _settled(page)
        assert new_id != old_id and position == 4
    else:
        await page.wait_for_selector("#frames-panel:not([hidden])")
        assert await page.inner_text("#session-line") == ""
    assert await page.get_attribute("#status", "class") != "error", await page.inner_text("#status")
    got, body = await _session_status(server, old_id)
    assert got == 400 and body["error"]["status"] == "FAILED_PRECONDITION", body
    live = _count(server, "CreateSession", "OK") - _count(server, "CloseSession", "OK")
    assert live == (1 if switch == "version" else 0)  # the stale step's pump made none
    assert not page.errors  # type: ignore[attr-defined]


async def test_generate_on_a_session_closed_elsewhere_replaces_it(
    server_factory: ServerFactory, browser: Browser
) -> None:
    """Generate finds the session closed (by another client here) before its first token: the
    page starts a new session from the text and generates on it, without showing the error."""
    server = await server_factory(store_root=BUNDLED_STORE, server={"http_port": 0})
    page = await _page(browser, server)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.type("#prompt", "hello")
    old_id, _ = await _settled(page)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        assert (await http.delete(f"/v1/sessions/{old_id}")).status == 200
    await page.fill("#max-tokens", "10")
    await page.click("#generate")
    assert (await _outcome(page, "done")).startswith("done")
    new_id = (await page.inner_text("#session-line")).split()[1]
    text = await page.input_value("#prompt")
    assert new_id != old_id and text.startswith("hello") and len(text) > len("hello")
    assert _count(server, "Generate", "OK") == 1
    assert not page.errors  # type: ignore[attr-defined]


async def test_the_session_lives_on_across_a_server_restart(
    server_factory: ServerFactory, browser: Browser, tmp_path: Path
) -> None:
    """With the server down the page keeps its session and retries: the step typed meanwhile
    reaches the restarted server (which restored the session from its spill tier), and a
    session closed while the server is down is closed once it is back, not left to its TTL."""
    spill = {"spill_dir": tmp_path / "shared-spill"}
    first = await server_factory(store_root=BUNDLED_STORE, server={"http_port": 0}, sessions=spill)
    port = {"http_port": first.http_port}  # the restarts listen where the page calls
    page = await _page(browser, first)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.type("#prompt", "def f(x")
    sid, _ = await _settled(page)
    await first.stop()
    await page.type("#prompt", ")")
    await page.wait_for_function(
        "document.querySelector('#status').textContent.includes('retrying')"
    )
    second = await server_factory(store_root=BUNDLED_STORE, server=port, sessions=spill)
    same_id, position = await _settled(page)
    assert same_id == sid and position == 8
    assert _count(second, "Step", "OK") == 1

    await second.stop()
    await page.select_option("#version", "1")  # closes the session while the server is down
    await page.wait_for_function(
        "document.querySelector('#status').textContent.includes('retrying')"
    )
    third = await server_factory(store_root=BUNDLED_STORE, server=port, sessions=spill)
    await page.wait_for_function(
        f"!document.querySelector('#session-line').textContent.includes('{sid}')"
    )
    new_id, _ = await _settled(page)
    assert new_id != sid
    got, body = await _session_status(third, sid)
    assert got == 400 and body["error"]["status"] == "FAILED_PRECONDITION", body
    assert not page.errors  # type: ignore[attr-defined]


class _LostAnswer:
    """Route `pattern`: the first POST reaches the server, which applies it and answers, but the
    page gets a reset connection instead of that answer (as from a proxy's 502, a dropped
    connection, a server killed right after its journal write); later calls pass. `lost` is
    what the server answered that first call, `sent` the body of every POST."""

    def __init__(self) -> None:
        self.lost: list[tuple[int, dict[str, Any]]] = []
        self.sent: list[dict[str, Any]] = []

    async def route(self, page: Page, pattern: str) -> _LostAnswer:
        await page.route(pattern, self._lose_once)
        return self

    async def _lose_once(self, route: Route) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        self.sent.append(route.request.post_data_json)
        if self.lost:
            await route.continue_()
            return
        answer = await route.fetch()
        self.lost.append((answer.status, await answer.json()))
        await route.abort("connectionreset")


def _created(server: SeqServeServer) -> float:
    """Sessions the server made (calls answered from a first call's record make none)."""
    total = 0.0
    for line in server.metrics.render().decode().splitlines():
        if line.startswith("seqserve_session_events_total{") and 'event="created"' in line:
            total += float(line.split()[-1])
    return total


async def test_a_step_whose_answer_was_lost_is_retried_as_the_same_request(
    server_factory: ServerFactory, browser: Browser
) -> None:
    """The server applied the step but its answer never reached the page: the retry carries
    the first attempt's requestId and expectedPosition, so the server answers it with the
    first reply rather than POSITION_MISMATCH, and the page keeps its session (README), the
    step applied once; typing goes on in it, each new step with a new requestId."""
    server = await server_factory(store_root=BUNDLED_STORE, server={"http_port": 0})
    page = await _page(browser, server)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.type("#prompt", "abc")
    sid, _ = await _settled(page)
    steps = await _LostAnswer().route(page, "**/*:step")
    await page.type("#prompt", "d")
    same_id, position = await _settled(page)
    [(code, lost)] = steps.lost
    assert code == 200 and lost["position"] == "4", lost  # the server applied "d"
    assert same_id == sid and position == 4, (await page.inner_text("#status"), steps.sent)
    first, retry = steps.sent
    assert first == retry and first["requestId"] and first["expectedPosition"] == "3", first
    got, body = await _session_status(server, sid)
    assert got == 200 and body["session"]["position"] == "4", body  # applied once

    await page.type("#prompt", "e")  # typing goes on in the same session
    after_id, position = await _settled(page)
    assert after_id == sid and position == 5
    assert len(steps.sent) == 3 and steps.sent[2]["requestId"] != first["requestId"]
    assert _count(server, "Step", "FAILED_PRECONDITION") == 0
    assert _created(server) == 1 and _count(server, "CloseSession", "OK") == 0
    assert await page.get_attribute("#status", "class") != "error", await page.inner_text("#status")
    assert not page.errors  # type: ignore[attr-defined]


async def test_a_create_whose_answer_was_lost_is_retried_as_the_same_request(
    server_factory: ServerFactory, browser: Browser
) -> None:
    """A backspace starts a new session from the text; the server made it but its answer was
    lost: the retry, with the same requestId, gets that session back (no second one left
    open until its TTL), and typing goes on in it."""
    server = await server_factory(store_root=BUNDLED_STORE, server={"http_port": 0})
    page = await _page(browser, server)
    await page.wait_for_selector("#tokens-panel:not([hidden])")
    await page.type("#prompt", "abc")
    old_id, _ = await _settled(page)
    creates = await _LostAnswer().route(page, "**/v1/sessions")
    await page.keyboard.press("Backspace")
    new_id, position = await _settled(page)
    [(code, lost)] = creates.lost
    assert code == 200 and lost["session"]["position"] == "2", lost
    assert new_id == lost["session"]["sessionId"] != old_id and position == 2, (
        await page.inner_text("#status"),
        creates.sent,
    )
    first, retry = creates.sent
    assert first == retry and first["requestId"] and first["prefix"] == {"text": "ab"}, first
    await page.type("#prompt", "x")
    same_id, position = await _settled(page)
    assert same_id == new_id and position == 3
    # The page load's session (closed by the backspace) and the backspace's: no third.
    assert _created(server) == 2 and _count(server, "CloseSession", "OK") == 1
    assert await page.get_attribute("#status", "class") != "error", await page.inner_text("#status")
    assert not page.errors  # type: ignore[attr-defined]

"""`run_load` against a real in-process server: what it measures, what it counts as errors,
and that it contacts nothing but its target."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from service.api.server import SeqServeServer
from service.loadtest import LoadConfig, TargetError, run_load
from service.loadtest.open_loop import OpenLoopDriver
from service.loadtest.progress import Progress
from service.loadtest.recorder import LoadRecorder
from service.loadtest.sessions import create_sessions
from service.loadtest.target import ModelInfo, open_channel
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc


def config(target: str, **overrides: object) -> LoadConfig:
    base: dict[str, object] = {"model": "tok", "sessions": 4, "duration_seconds": 1.0}
    return LoadConfig(target=target, **{**base, **overrides})  # type: ignore[arg-type]


def assert_ordered(summary: object) -> None:
    assert summary is not None
    s = summary
    assert 0 < s.p50 <= s.p90 <= s.p99 <= s.max  # type: ignore[attr-defined]
    assert s.count > 0  # type: ignore[attr-defined]


async def test_streaming_sessions_with_generate_rpc(target: str, server: SeqServeServer) -> None:
    seen: list[Progress] = []

    report = await run_load(
        config(target, generate_fraction=0.5, max_tokens=4, seed=3),
        progress=seen.append,
        progress_interval=0.25,
    )

    assert report.sessions == 4
    assert report.tokens_in > 0 and report.tokens_generated > 0
    assert report.tokens_per_second > 0
    assert report.generations > 0
    assert_ordered(report.step_latency)
    assert_ordered(report.time_to_first_token)
    assert_ordered(report.inter_token_latency)
    assert report.errors == {}
    assert [p.phase for p in seen][-1] == "draining"
    assert any(p.phase == "measuring" and p.tokens_per_second > 0 for p in seen)
    assert list(server.engine.sessions) == []  # every session was closed afterwards


async def test_multiplexed_frames_carry_one_item_per_session(target: str) -> None:
    report = await run_load(
        config(target, sessions=6, multiplex=3, generate_fraction=0.5, generate_via="stream")
    )

    assert report.messages > 0
    assert report.items == 3 * report.messages  # two streams, three sessions in every frame
    assert report.tokens_generated > 0 and report.tokens_in > 0
    assert_ordered(report.time_to_first_token)
    assert report.errors == {}


async def test_invalid_sessions_are_counted_by_status_code(target: str) -> None:
    report = await run_load(config(target, sessions=2, invalid_sessions=1))

    assert report.sessions == 2
    assert report.errors["NOT_FOUND"] > 0
    assert set(report.errors) == {"NOT_FOUND"}
    assert report.errors_by_operation == {"stream": {"NOT_FOUND": report.errors["NOT_FOUND"]}}
    assert "loadtest-invalid-0" in report.error_examples["NOT_FOUND"]
    assert report.tokens_in > 0  # the valid sessions went on
    assert sum(p.errors for p in report.timeline) == report.errors["NOT_FOUND"]


async def test_feature_model_is_fed_frames(target: str) -> None:
    report = await run_load(config(target, model="frames", sessions=3, tokens_per_message=2))

    assert report.input_kind == "features"
    assert report.step_latency is not None
    assert report.tokens_in == 2 * report.step_latency.count
    assert report.errors == {}


async def test_history_is_fed_before_the_window(target: str) -> None:
    channel = open_channel(target)
    try:
        stub = pb_grpc.SessionServiceStub(channel)
        recorder = LoadRecorder()
        model = ModelInfo(name="tok", version=1, input_kind="tokens", input_size=256)
        sessions = await create_sessions(
            stub, config(target, sessions=2, history=1500), model, recorder
        )
        positions = [
            (await stub.GetSession(pb.GetSessionRequest(session_id=s.session_id))).session.position
            for s in sessions
        ]
    finally:
        await channel.close()

    assert positions == [1500, 1500]
    assert not recorder.errors


async def test_an_open_loop_that_starts_late_sends_what_it_missed_at_once(target: str) -> None:
    """The schedule starts with the load, not when the driver first runs: a driver held up
    half a second (a busy loop) still has that half second's arrivals, sent late."""
    channel = open_channel(target)
    try:
        stub = pb_grpc.SessionServiceStub(channel)
        recorder = LoadRecorder()
        model = ModelInfo(name="tok", version=1, input_kind="tokens", input_size=256)
        # --max-lag far off: a busy host's stall sends them later, it drops none of them.
        cfg = config(target, rate=200.0, sessions=4, seed=5, late_ms=10.0, max_lag_seconds=30.0)
        sessions = await create_sessions(stub, cfg, model, recorder)
        start = time.perf_counter() - 0.5  # the load began half a second ago
        recorder.open_window(start, 0.5)
        stop = asyncio.Event()
        driver = OpenLoopDriver(stub, sessions, cfg, model, recorder, stop, start)
        run = asyncio.create_task(driver.run())
        for _ in range(12_000):  # until one went out on each session (a busy host takes longer)
            if len(recorder.send_lag) >= 4:
                break
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(run, 30)
    finally:
        await channel.close()
    # 200/s over the missed 0.5 s: Poisson, mean 100, sd 10; all due before the driver ran.
    assert 60 < recorder.arrivals < 140
    # Those sent before the stop (the oldest first: at least one per session at once; on a
    # busy machine the 4 sessions may get through few of them) were sent late, and counted so.
    sent = recorder.arrivals - len(recorder.dropped)
    assert sent >= 4
    assert recorder.late > 0.5 * sent
    # Each was due in the window and sent after it ended: a message of the window all the same
    # (open-loop counts go by arrival), so messages/s and `sent` never disagree.
    assert len(recorder.messages) == sent


async def test_unknown_model_is_refused_before_any_load(target: str) -> None:
    with pytest.raises(TargetError, match="NOT_FOUND"):
        await run_load(config(target, model="no-such-model"))


async def test_generation_needs_a_token_model(target: str) -> None:
    with pytest.raises(TargetError, match="generation needs a token model"):
        await run_load(config(target, model="frames", generate_fraction=0.5))


async def test_unreachable_target_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        with pytest.raises(TargetError, match="accepted no connection"):
            await run_load(config(f"127.0.0.1:{port}", ready_timeout_seconds=0.3))


async def test_server_going_away_midway_is_reported_not_raised(
    target: str, server: SeqServeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stop_soon() -> None:
        await asyncio.sleep(0.4)
        await server.stop()

    # 0.4 s into the window, however long the set-up before it took on a busy host.
    stoppers: list[asyncio.Task[None]] = []
    opened = LoadRecorder.open_window

    def open_window(recorder: LoadRecorder, start: float, seconds: float) -> None:
        opened(recorder, start, seconds)
        stoppers.append(asyncio.get_running_loop().create_task(stop_soon()))

    monkeypatch.setattr(LoadRecorder, "open_window", open_window)
    report = await run_load(config(target, duration_seconds=1.5, drain_seconds=1.0))
    (stopper,) = stoppers
    await stopper

    assert report.tokens_in > 0  # before the stop
    # After it: items refused in-band while the server drains, then streams torn down (the
    # client's transport reports those as it sees them), then sessions that cannot be closed.
    assert report.errors_by_operation["stream"]["UNAVAILABLE"] > 0
    assert report.errors_by_operation["close"] == {"UNAVAILABLE": 4}


class _ConnectionCounter:
    """A TCP listener standing in for a proxy: counts connections made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def on_connect(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[_ConnectionCounter]:
    counter = _ConnectionCounter()
    async with counter as url:
        for name in ("grpc_proxy", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            monkeypatch.setenv(name, url)
        for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
            monkeypatch.delenv(name, raising=False)
        yield counter


async def test_arrivals_a_blocked_event_loop_never_issued_are_counted_as_dropped(
    target: str, server: SeqServeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop blocked from 0.4 s into the 1 s window until past its end (a starved
    process): the arrivals due meanwhile were never issued. They are arrivals all the same,
    counted as dropped; before, the schedule stopped with the load and they were not counted,
    so a busy machine read as a lower arrival rate."""
    opened = LoadRecorder.open_window

    def open_window(recorder: LoadRecorder, start: float, seconds: float) -> None:
        opened(recorder, start, seconds)
        asyncio.get_running_loop().call_later(0.4, time.sleep, 0.8)

    monkeypatch.setattr(LoadRecorder, "open_window", open_window)
    report = await run_load(config(target, rate=200.0, sessions=8, seed=5))
    o = report.open_loop
    assert o is not None
    assert 140 < o.arrivals < 260  # the whole second's schedule: ~200
    assert o.sent + o.dropped == o.arrivals
    assert o.dropped >= 0.3 * o.arrivals  # the last ~0.6 s never went out


async def test_proxy_settings_never_divert_traffic(target: str, proxy: _ConnectionCounter) -> None:
    report = await run_load(config(target, sessions=2, duration_seconds=0.5))

    assert report.tokens_in > 0
    assert proxy.connections == 0


async def test_open_loop_keeps_its_poisson_schedule_and_accounts_for_every_arrival(
    target: str, server: SeqServeServer
) -> None:
    report = await run_load(config(target, rate=200.0, sessions=8, seed=5))

    o = report.open_loop
    assert report.mode == "open" and o is not None
    # 200/s for 1 s: Poisson, mean 200, sd ~14.
    assert 140 < o.arrivals < 260
    assert o.sent + o.dropped == o.arrivals  # every arrival is sent or counted as dropped
    # How many of them were sent on time is this host's speed (a benchmark's to say, not a
    # test's): a busy machine sends fewer, drops and lates more.
    assert o.sent > 0
    assert o.send_lag is not None and o.send_lag.count == o.sent
    assert report.step_latency is not None
    assert 0.8 * o.sent <= report.step_latency.count <= o.sent
    assert report.tokens_in == report.step_latency.count  # one token per request
    assert report.messages == o.sent and report.errors == {}
    assert list(server.engine.sessions) == []  # closed afterwards


async def test_open_loop_counts_late_and_dropped_and_measures_from_the_intended_time(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One session, and every request a 48-token generation: the server cannot keep up with
    # 150 arrivals a second, so requests queue for the session, start late, and some are
    # dropped after waiting 0.25 s. A closed loop would just slow down and report the server's
    # own latency; here time spent queued counts in the time to first token.
    # And once, the event loop blocks for 0.4 s just after an arrival was given the session,
    # before its request ran (a busy host): still waiting at 0.25 s, it is dropped too (it was
    # sent 0.4 s late, past --max-lag). Two seconds, so that after the block (and any stall
    # of a busy host) some requests are still sent in the window.
    handed = OpenLoopDriver._start_ready
    blocked: list[bool] = []

    def start_ready(driver: OpenLoopDriver) -> None:
        before = len(driver._requests)
        handed(driver)
        if len(driver._requests) > before and not blocked:
            blocked.append(True)
            time.sleep(0.4)

    monkeypatch.setattr(OpenLoopDriver, "_start_ready", start_ready)
    report = await run_load(
        config(
            target, rate=150.0, sessions=1, generate_fraction=1.0, max_tokens=48,
            temperature=0.0, max_lag_seconds=0.25, seed=2, duration_seconds=2.0,
        )
    )  # fmt: skip

    o = report.open_loop
    assert o is not None and o.arrivals > 120
    assert o.late > 0 and o.dropped > 0
    assert o.sent + o.dropped == o.arrivals
    ttft, lag = report.time_to_first_token, o.send_lag
    assert ttft is not None and lag is not None
    assert lag.max > 0.05  # requests waited for the session
    assert blocked and lag.max <= 0.25  # none was sent past --max-lag, however late it ran
    # Each request's TTFT includes its wait: the distribution sits above the lags'.
    assert ttft.p50 >= lag.p50 and ttft.max >= 0.8 * lag.max
    assert report.step_latency is None  # generations only
    assert sum(p.dropped for p in report.timeline) == o.dropped


async def test_open_loop_errors_are_counted_per_step(target: str) -> None:
    report = await run_load(config(target, rate=100.0, sessions=1, invalid_sessions=1))

    assert set(report.errors_by_operation) == {"step"}
    assert report.errors_by_operation["step"]["NOT_FOUND"] > 0
    assert report.tokens_in > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rate": -1.0}, "rate must be >= 0"),
        ({"rate": float("inf")}, "rate must be >= 0 and <= 1,000,000"),
        ({"rate": float("nan")}, "rate must be >= 0"),
        ({"rate": 10.0, "think_ms": 5.0}, "--think-ms applies to the closed loop"),
        ({"rate": 10.0, "multiplex": 2}, "--multiplex applies to the closed loop"),
        ({"rate": 10.0, "generate_via": "stream"}, "--generate-via stream applies"),
        ({"rate": 10.0, "max_lag_seconds": 0.0}, "max lag must be > 0"),
    ],
)
def test_open_loop_config_is_validated(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config("127.0.0.1:1", **overrides).validate()

"""Runs one load test end to end and returns its report.

    report = await run_load(LoadConfig(target="127.0.0.1:50051", sessions=64, duration_seconds=30))

Phases: connect (wait until the target accepts calls), inspect the model, create sessions
(and prefill their history), drive them for warmup + duration (closed loops, or one open loop
of Poisson arrivals at `rate`), let in-flight turns finish (up to `drain_seconds`), close the
sessions. Only the window after the warmup is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc

from service.client.credentials import Credentials
from service.loadtest.client_mux import ClientMuxDriver
from service.loadtest.config import LoadConfig
from service.loadtest.drivers import ClientSession, StreamGroupDriver
from service.loadtest.open_loop import OpenLoopDriver
from service.loadtest.progress import Progress, ProgressTracker
from service.loadtest.recorder import LoadRecorder
from service.loadtest.report import LoadReport, build_report
from service.loadtest.sessions import close_sessions, create_sessions
from service.loadtest.target import ModelInfo, TargetError, fetch_model_info, open_channel
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc

ProgressCallback = Callable[[Progress], None]


async def run_load(
    config: LoadConfig,
    progress: ProgressCallback | None = None,
    progress_interval: float = 1.0,
    credentials: Credentials | None = None,
) -> LoadReport:
    """Raises ValueError for a bad config and TargetError when the target cannot be tested
    (unreachable, unknown model); failures during the run are counted in the report.
    `credentials`: token and TLS (default: SEQSERVE_TOKEN, plain text); never reported."""
    config.validate()
    channel = open_channel(config.target, credentials)
    try:
        return await _run(channel, config, progress, progress_interval, credentials)
    finally:
        await channel.close()


async def _run(
    channel: grpc.aio.Channel,
    config: LoadConfig,
    progress: ProgressCallback | None,
    progress_interval: float,
    credentials: Credentials | None = None,
) -> LoadReport:
    try:
        await asyncio.wait_for(channel.channel_ready(), config.ready_timeout_seconds)
    except TimeoutError:
        raise TargetError(
            f"{config.target} accepted no connection within {config.ready_timeout_seconds:g} s"
        ) from None
    try:
        model = await fetch_model_info(channel, config.model, config.version)
    except grpc.aio.AioRpcError as exc:
        raise TargetError(f"model {config.model!r}: {exc.code().name}: {exc.details()}") from exc
    if config.generate_fraction > 0 and model.input_kind != "tokens":
        raise TargetError(
            f"model {model.name!r} takes feature frames; generation needs a token model"
        )
    stub = pb_grpc.SessionServiceStub(channel)

    recorder = LoadRecorder()
    sessions = await create_sessions(stub, config, model, recorder)
    created = sum(s.created for s in sessions)

    started = time.perf_counter()
    recorder.open_window(started + config.warmup_seconds, config.duration_seconds)
    stop = asyncio.Event()
    drivers: list[StreamGroupDriver] | list[OpenLoopDriver] | list[ClientMuxDriver] = []
    if config.client_mux and sessions:  # one app-style loop per session, one client
        drivers = [ClientMuxDriver(sessions, config, model, recorder, stop, credentials)]
    elif config.open_loop and sessions:  # one schedule of arrivals over every session
        drivers = [OpenLoopDriver(stub, sessions, config, model, recorder, stop, started)]
    elif not config.open_loop:
        drivers = [
            StreamGroupDriver(stub, group, config, model, recorder, stop)
            for group in _groups(sessions, config.multiplex)
        ]
    tasks = [asyncio.create_task(d.run()) for d in drivers]
    tracker = ProgressTracker(
        recorder, created, started, config.warmup_seconds + config.duration_seconds
    )
    try:
        await _wait_window(recorder, tasks, tracker, progress, progress_interval)
        stop.set()
        recorder.close(time.perf_counter())
        if progress is not None:
            progress(tracker.snapshot(time.perf_counter(), "draining"))
        await _drain(tasks, config.drain_seconds)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await close_sessions(stub, sessions, recorder)
    for task in tasks:  # a driver bug must not pass silently as a quiet report
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return _report(recorder, config, model, created)


def _groups(sessions: list[ClientSession], size: int) -> list[list[ClientSession]]:
    return [sessions[i : i + size] for i in range(0, len(sessions), size)]


async def _wait_window(
    recorder: LoadRecorder,
    tasks: list[asyncio.Task[None]],
    tracker: ProgressTracker,
    progress: ProgressCallback | None,
    interval: float,
) -> None:
    """Until the window ends (or every driver has stopped), reporting progress."""
    while True:
        now = time.perf_counter()
        left = recorder.window_end - now
        if left <= 0 or all(t.done() for t in tasks):
            return
        done, _ = await asyncio.wait(tasks, timeout=min(left, interval))
        if progress is not None and time.perf_counter() < recorder.window_end:
            now = time.perf_counter()
            phase = "warmup" if now < recorder.window_start else "measuring"
            progress(tracker.snapshot(now, phase))
        if any(t.exception() is not None for t in done if not t.cancelled()):
            return


async def _drain(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    if not tasks:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True), seconds
        )


def _report(
    recorder: LoadRecorder, config: LoadConfig, model: ModelInfo, created: int
) -> LoadReport:
    return build_report(
        recorder,
        config.to_dict(),
        model=model.name,
        version=model.version,
        input_kind=model.input_kind,
        sessions=created,
    )


__all__ = ["LoadReport", "ProgressCallback", "TargetError", "run_load"]

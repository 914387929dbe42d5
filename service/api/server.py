"""The gRPC server's life: binds, serves health and reflection, starts the engine, and shuts
down gracefully. Its parts come from the composition root (`service.wiring`).

Start-up is two steps: `listen()` binds and starts gRPC with every health status NOT_SERVING
(seqserve.v1 calls are refused with UNAVAILABLE), then `open()` starts the engine, loads the
versions new sessions will ask for (every aliased and default version, and `engine.preload`)
and turns health to SERVING. `start()` does both. The metrics port's `/readyz` answers 200
exactly while health is SERVING (not before `open()` is done, not while draining); `/healthz`
200 from `listen()` on."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from collections.abc import Callable

import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.event_loop import grpc_server
from service.api.gc_tuning import HeapFreezer, freeze_heap
from service.api.listen_check import check_bindable
from service.errors import PortInUse
from service.pb import SERVICE_NAMES
from service.pb.seqserve.v1 import model_registry_pb2_grpc, session_service_pb2_grpc
from service.security.tls import check_bind, server_credentials, server_ssl_context
from service.settings import Settings
from service.wiring import build_server_parts

log = logging.getLogger(__name__)

LIVENESS = "seqserve.liveness"  # the health service name a liveness probe asks for

_GAUGE_REFRESH_SECONDS = 1.0
_GC_TICK_SECONDS = 1.0  # the young collection's bound, and how soon a skipped thaw is retried


class SeqServeServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        torch.set_num_threads(settings.engine.torch_threads)
        if settings.engine.device.startswith("cuda"):
            # cuDNN's RNN defaults to TF32 for fp32: chunks would drift ~1e-3 from single steps.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self._open = False  # set by open(): until then seqserve.v1 calls get UNAVAILABLE
        self.parts = build_server_parts(settings, ready=lambda: self._open)
        self.store = self.parts.store
        self.metrics = self.parts.metrics
        self.metrics_observer = self.parts.observer
        self.engine = self.parts.engine
        limit = settings.server.max_message_bytes
        # The options live in one function the benchmark's echo server uses too.
        self.grpc = grpc_server(
            limit, reuse_port=settings.server.worker >= 0, interceptors=[self.parts.interceptor]
        )
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0  # the HTTP/JSON API's; 0 while it is off (`http_port` -1)
        self._refresher: asyncio.Task[None] | None = None
        self._heap = HeapFreezer()  # installed by tune_gc
        self._heap_tender: asyncio.Task[None] | None = None  # started by tune_gc
        self._health: health.aio.HealthServicer | None = None
        self._engine_started = False  # set by open(): an engine never started is not stopped
        self._stopping = False
        self._stopped = asyncio.Event()
        self._refusing_writes = False  # its disk refuses the journal's writes: not ready

    async def start(self) -> None:
        """`listen()`, then `open()`. If opening fails, gRPC is stopped again."""
        await self.listen()
        try:
            await self.open()
        except BaseException:
            await self.grpc.stop(None)
            await self.parts.http.stop()
            self.metrics.stop()
            raise

    async def listen(self) -> None:
        """Bind and start gRPC, every health status NOT_SERVING. Health and reflection answer;
        SessionService and ModelRegistry refuse with UNAVAILABLE until `open()`."""
        s = self.settings.server
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(
            self.parts.session_servicer, self.grpc
        )
        model_registry_pb2_grpc.add_ModelRegistryServicer_to_server(
            self.parts.registry_servicer, self.grpc
        )
        health_servicer = health.aio.HealthServicer()  # starts with "" SERVING: not yet
        for name in ("", *SERVICE_NAMES):
            await _set_health(health_servicer, name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # For a liveness probe: SERVING from now until the process exits, through recovery,
        # model loading and draining (readiness follows "" and the services' names).
        await _set_health(health_servicer, LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.grpc)
        sec = self.settings.security
        check_bind(s.host, sec)
        credentials = server_credentials(sec)
        if sec.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME),
                self.grpc,
            )  # fmt: skip
        # Metrics first: a gRPC server that bound its port but never started keeps it bound.
        if s.metrics_port >= 0:
            tls = {}
            if sec.metrics_tls:
                tls = {"certfile": sec.tls_cert, "keyfile": sec.tls_key,
                       "client_cafile": sec.tls_client_ca}  # fmt: skip
            try:
                self.metrics_port = self.metrics.start_http_server(
                    s.metrics_host, s.metrics_port, ready=self.ready, **tls
                )
            except OSError as exc:
                fix = (
                    "set --server.metrics-host to an address of this machine"
                    if exc.errno == errno.EADDRNOTAVAIL
                    else "set --metrics-port, or -1 to turn it off"
                )
                raise PortInUse(
                    f"cannot listen for metrics on {s.metrics_host}:{s.metrics_port}: "
                    f"{exc.strerror or exc} ({fix})"
                ) from None
        if s.worker < 0 and s.port > 0:  # said here, before gRPC's own line on stderr
            try:
                check_bindable(s.host, s.port)
            except PortInUse:
                self.metrics.stop()  # already up
                raise
        address = f"{s.host}:{s.port}"
        try:
            if credentials is None:
                self.port = self.grpc.add_insecure_port(address)
            else:
                self.port = self.grpc.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            self.metrics.stop()
            raise PortInUse(
                f"cannot listen on {s.host}:{s.port}: the address is in use or not available "
                "(is another seqserve running? set --port or SEQSERVE_SERVER__PORT)"
            )
        await self.grpc.start()
        if s.http_port >= 0:
            try:
                self.http_port = await self.parts.http.start(
                    s.host, s.http_port, server_ssl_context(sec), shared=s.worker >= 0
                )
            except BaseException:
                await self.grpc.stop(None)
                self.metrics.stop()
                raise
        self._health = health_servicer
        metrics = f"on {s.metrics_host}:{self.metrics_port}" if s.metrics_port >= 0 else "off"
        http = f"on {s.host}:{self.http_port}" if s.http_port >= 0 else "off"
        log.info(
            "seqserve listening on %s:%d (HTTP %s, metrics %s, store %s); starting",
            s.host, self.port, http, metrics, self.settings.model_store,
        )  # fmt: skip

    async def open(self) -> None:
        """Start the engine (resuming spilled sessions), then accept calls and report SERVING.
        Call after `listen()`."""
        if self._health is None:
            raise RuntimeError("open() before listen()")
        self._engine_started = True
        await self.engine.start()
        loaded = await self.engine.versions.preload(self.settings.engine.preload)
        log.info("loaded %s", ", ".join(f"{n}:{v}" for n, v in loaded) or "no model version")
        if self._stopping:  # stop() began meanwhile: stay NOT_SERVING
            return
        self._open = True
        for name in ("", *SERVICE_NAMES):
            await _set_health(self._health, name, health_pb2.HealthCheckResponse.SERVING)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_gauges())
        log.info("seqserve serving on port %d", self.port)

    def ready(self) -> bool:
        """Whether the server takes calls: opened (models loaded), not draining, and its disk
        taking the journal's writes. Called from the metrics endpoint's thread (reads three
        booleans)."""
        return self._open and not self._stopping and not self._refusing_writes

    def tune_gc(self) -> None:
        """Process-wide GC tuning, for `serve` (not for servers embedded in other programs):
        see `service.api.gc_tuning`. Call on the event loop."""
        s = self.settings.server
        if s.gc_gen0_threshold <= 0:
            return
        self.metrics_observer.tuning_gc = True
        freeze_heap(s.gc_gen0_threshold)
        self._heap.install()
        if self._heap_tender is None:
            self._heap_tender = asyncio.get_running_loop().create_task(
                self._tend_heap(s.gc_thaw_seconds)
            )

    async def _tend_heap(self, thaw_every: float) -> None:
        """Every second a young collection, if none ran (`HeapFreezer.collect_young`); every
        `thaw_every` seconds (0: never) a thaw, tried again at the next tick when a collection
        on another thread was under way."""
        tick = min(_GC_TICK_SECONDS, thaw_every) if thaw_every > 0 else _GC_TICK_SECONDS
        thaw_at = time.monotonic() + thaw_every
        while True:
            await asyncio.sleep(tick)
            self._heap.collect_young(_GC_TICK_SECONDS)
            if thaw_every <= 0 or time.monotonic() < thaw_at:
                continue
            try:
                found = self._heap.thaw()
            except Exception:  # the next period tries again; stop() must not see this
                log.exception("GC: the thaw failed")
                found = 0
            if found is None:  # a collection on another thread was under way
                continue
            thaw_at = time.monotonic() + thaw_every
            self.metrics.count_thawed_garbage(found)
            log.info("GC: thawed the heap; %d unreachable objects freed", found)

    async def stop(self) -> None:
        """Stop accepting, let in-flight RPCs finish (up to the grace period), then stop the
        engine, which writes every session to the spill tier for the next start."""
        if self._stopped.is_set():
            return
        self._stopping = True
        if self._health is not None:
            for name in ("", *SERVICE_NAMES):
                await _set_health(self._health, name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine.begin_draining()  # streams still open get UNAVAILABLE for new items
        try:
            self.parts.http.begin_draining()
            await asyncio.gather(
                self.grpc.stop(self.settings.server.grace_seconds), self.parts.http.stop()
            )
            if self._engine_started:  # stopped before open(): the spill tier was never opened
                await self.engine.stop()
        except Exception:  # whatever the disk did, the process must still exit
            log.exception("shutdown did not finish cleanly")
        finally:
            for task in (self._refresher, self._heap_tender):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.parts.auth.revocations is not None:
                await self.parts.auth.revocations.close()
            self._heap.uninstall()
            self.metrics_observer.close()
            self.metrics.stop()
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _refresh_gauges(self) -> None:
        while True:
            self.refresh_gauges()
            await self.follow_state_dir()
            await asyncio.sleep(_GAUGE_REFRESH_SECONDS)

    async def follow_state_dir(self) -> None:
        """Readiness follows the state directory: while its disk refuses the journal's writes
        every step is refused (UNAVAILABLE), so health goes NOT_SERVING (and `/readyz` 503) and
        a balancer sends new work to other replicas; liveness stays SERVING, and reads still
        work (a close, journaled too, is refused like a step). Each second a probe looks
        whether the disk takes writes again."""
        refusing = not await self.engine.state_takes_writes()
        if refusing == self._refusing_writes:
            return
        self._refusing_writes = refusing
        if self._stopping or self._health is None:
            return
        if refusing:
            log.error("not ready: the state directory refuses writes (steps get UNAVAILABLE)")
        else:
            log.warning("ready again: the state directory takes writes")
        answer = health_pb2.HealthCheckResponse
        status = answer.NOT_SERVING if refusing else answer.SERVING
        for name in ("", *SERVICE_NAMES):
            if self._stopping:  # a drain's NOT_SERVING stands
                return
            await _set_health(self._health, name, status)

    def refresh_gauges(self) -> None:
        stats = self.engine.stats()
        self.metrics.set_sessions("memory", stats.sessions_in_memory)
        self.metrics.set_sessions("spilled", stats.sessions_spilled)
        self.metrics.set_sessions("replaying", stats.sessions_replaying)
        for v in stats.versions:
            self.metrics.set_queue_depth(v.model, str(v.version), v.queue_depth)
        self.metrics.set_state_bytes("memory", sum(v.state_bytes for v in stats.versions))
        self.metrics.set_pool_capacity_bytes(stats.pool_capacity_bytes)
        self.metrics.set_state_bytes("spilled", stats.spilled_bytes)
        self.metrics.set_state_write_failures("journal", stats.journal_write_failures)
        self.metrics.set_state_write_failures("end", stats.end_records_lost)
        self.metrics.set_state_write_failures("checkpoint", stats.state_write_failures)
        self.metrics.set_damaged_records("journal", stats.journal_damaged_records)
        self.metrics.set_damaged_records("checkpoint", stats.damaged_checkpoints)
        self.metrics.set_state_writes(stats.state_writes, stats.state_write_seconds)
        self.metrics.observe_gc_pauses(self._heap.drain())


async def _set_health(servicer, name: str, status) -> None:  # type: ignore[no-untyped-def]
    result = servicer.set(name, status)
    if asyncio.iscoroutine(result):
        await result


async def serve(
    settings: Settings, on_started: Callable[[SeqServeServer], None] | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (sessions go to the spill tier).
    `on_started` is called once the server listens (e.g. to publish the bound port)."""
    server = SeqServeServer(settings)
    await server.start()
    server.tune_gc()
    if on_started is not None:
        on_started(server)
    loop = asyncio.get_running_loop()
    stopping: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stopping
        log.info("received %s: draining", signal.Signals(signum).name)
        if stopping is None:
            stopping = loop.create_task(server.stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.wait_stopped()

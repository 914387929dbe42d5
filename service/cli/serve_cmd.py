"""`seqserve serve`: run the gRPC server (and the metrics endpoint) until SIGTERM/SIGINT.

On SIGTERM every session is written to the spill directory; started again on the same
directory, the server resumes each one where it stopped. SIGTERM or SIGINT during start-up
(model loading can take seconds) ends it with one line and status 0: see `StartupSignals`.

This module imports little at the top (settings and pydantic inside the functions): `run()` of
`service.cli.main` imports it first thing, to take the signals over from the process's start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from service.api.server import SeqServeServer
    from service.settings import Settings

log = logging.getLogger("service.cli.serve_cmd")


class StoppedDuringStartup(BaseException):
    """SIGTERM or SIGINT arrived before the server served. A BaseException, as
    KeyboardInterrupt is: raised from a signal handler, it must not be taken for an error of
    whatever code it interrupts (an `except Exception` there)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.name = signal.Signals(signum).name


class StartupFailed(Exception):
    """The server started but could not finish starting (its `--port-file` could not be
    written): it was drained and stopped; `str()` is the one line to print."""


class StartupSignals:
    """SIGTERM and SIGINT from the start of `seqserve serve` until the server takes them over
    (`service.api.server.serve` installs its own handlers once it serves, and the supervisor
    of `--workers` its own). Python's defaults would end a start-up abruptly: SIGTERM as a bare
    signal death with no line, SIGINT with a traceback from wherever it was. Here either ends
    start-up as a drain ends serving: before the event loop runs, the handler raises
    `StoppedDuringStartup` (nothing is open yet); on the loop, it cancels the start-up task,
    as asyncio's own SIGINT handler would, so the server closes its ports on the way out.

    Python runs a handler wherever the main thread is, and an exception raised there is lost
    when that is a weakref callback or a `__del__` (importlib runs one on every import): so
    the signal is kept (`signum`) until something acts on it (`_acted`), a later signal acts
    again meanwhile, and `check` (before the loop awaits `serve`, and by the `--workers`
    supervisor once its own handlers are in) and `started` act on one still kept. Such a
    lost exception is not printed either (`_on_unraisable`)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal that stops start-up
        self._acted = False  # a stop is under way for it: later signals change nothing
        self._previous: dict[int, Any] = {}  # the handlers found: `restore` puts them back
        self._unraisable = sys.unraisablehook  # the hook found: `restore` puts it back
        self._task: asyncio.Task[None] | None = None  # the start-up, once on the loop
        self._server: SeqServeServer | None = None  # the server, once it listens and loaded
        self._failure: str | None = None  # why `fail` stopped a started server

    def guard(self, command: Callable[[], int]) -> int:
        """`command()` (the serve command, or `main()` from the process's start) with the
        handlers installed, and the one line and status 0 of a start-up stopped. The handlers
        found are put back after (`main()` may run in a longer process: a test's)."""
        installed = self._install()
        try:
            return command()
        except StoppedDuringStartup as exc:
            self._acted = True  # first: CPython runs handlers at calls, none comes before
            print(f"seqserve serve: received {exc.name}: stopping during start-up", file=sys.stderr)
            return 0
        finally:
            if installed:
                self._restore()

    def check(self) -> None:
        """Raise `StoppedDuringStartup` for a signal kept but not acted on (its handler's
        exception was lost). Call where start-up may still stop as if it had not started."""
        if self.signum is not None and not self._acted:
            raise StoppedDuringStartup(self.signum)

    def _install(self) -> bool:
        """Whether this call installed them (not when installed already, nor off the main
        thread, where Python sets no handler)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return False
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._on_unraisable
        return True

    def _on_unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        """A `StoppedDuringStartup` lost (in a weakref callback, a `__del__`) is no error to
        print: its signal is kept, and acted on at the next `check`, `started` or signal."""
        if not isinstance(unraisable.exc_value, StoppedDuringStartup):
            self._unraisable(unraisable)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        sys.unraisablehook = self._unraisable
        self.signum, self._acted, self._task, self._server = None, False, None, None
        self._failure = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._acted:  # stopping already
            return
        self.signum = self.signum or signum  # kept: the exception below may be lost
        if self._task is None:
            raise StoppedDuringStartup(self.signum)
        if self._task.done():  # the loop is closed or closing: the process is exiting anyway
            return
        self._cancel()

    def _cancel(self) -> None:
        assert self._task is not None, "cancel before the start-up task runs"
        self._task.cancel()
        self._task.get_loop().call_soon_threadsafe(lambda: None)  # wake it from its select

    def started(self, server: SeqServeServer) -> None:
        """`serve`'s `on_started`: the server listens and has loaded its models. A signal kept
        but not acted on (its cancel was swallowed on the way) stops it now: the cancel lands
        at `serve`'s next await, and `run` drains the server as its handlers would."""
        self._server = server
        if self.signum is not None and not self._acted:
            self._cancel()

    def fail(self, message: str) -> None:
        """From `on_started`, after `started`: the server must not serve on (its port file
        could not be written, so whoever waits for it would wait forever). The cancel lands at
        `serve`'s next await; `run` drains the server as a signal would, then raises
        `StartupFailed(message)`."""
        if self._acted or self._task is None:  # stopping already
            return
        self._failure = message
        self._cancel()

    async def run(self, main: Coroutine[Any, Any, None]) -> None:
        """Await `main` (`serve`) as the task a signal cancels. A cancel that lands once the
        server has started (between its `on_started` and its own handlers) stops it as its
        handlers would."""
        import asyncio

        self._task = asyncio.current_task()
        if self.signum is not None:  # a signal before the loop whose exception was lost
            main.close()  # never awaited: closed, so no warning says so
            raise StoppedDuringStartup(self.signum)
        try:
            await main
        except asyncio.CancelledError:
            if self.signum is None and self._failure is not None:
                self._acted = True
                assert self._server is not None, "fail() comes after started()"
                await self._server.stop()
                raise StartupFailed(self._failure) from None
            if self.signum is None:
                raise
            self._acted = True
            if self._server is not None:
                log.info("received %s: draining", signal.Signals(self.signum).name)
                await self._server.stop()  # the drain its handlers would have started
                return
            raise StoppedDuringStartup(self.signum) from None


STARTUP_SIGNALS = StartupSignals()


def register(sub: argparse._SubParsersAction) -> None:
    from service.cli.settings_flags import add_config_argument, add_settings_arguments

    p = sub.add_parser(
        "serve",
        help="run the gRPC server on a model store",
        description="Run the gRPC server. Every setting is a flag (below), an environment "
        "variable (SEQSERVE_<SECTION>__<NAME>) or an entry of the --config file; "
        "precedence: flags > env > config file > defaults.",
    )
    add_config_argument(p)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run N server processes on the port (one per core), sharing the state directory",
    )
    p.add_argument(
        "--port-file",
        type=Path,
        help="once listening, write the gRPC, metrics and HTTP ports here as JSON (for --port 0)",
    )
    add_settings_arguments(p)
    p.set_defaults(func=run)


def check_port_file(path: Path) -> None:
    """InvalidArgument unless a port file can be written at `path` (before start-up: a path
    that is a directory, or in a directory that does not exist or cannot be written, was a
    traceback once the server served)."""
    from service.errors import InvalidArgument

    parent = path.parent
    if path.is_dir():
        raise InvalidArgument(f"--port-file {path} is a directory; name a file")
    if not parent.is_dir():
        raise InvalidArgument(f"--port-file {path}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"--port-file {path}: directory {parent} is not writable")


def write_json_file(path: Path, text: str) -> None:
    """Atomically, so a reader polling for the file never sees half of it: a temporary file
    beside it renamed over it, and removed when that fails (OSError)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # not a directory: `check_port_file` refused that
        raise


def write_port_file(path: Path, server: SeqServeServer) -> None:
    write_json_file(
        path,
        f'{{"port": {server.port}, "metrics_port": {server.metrics_port}, '
        f'"http_port": {server.http_port}}}\n',
    )


def worker_argv(args: argparse.Namespace) -> list[str]:
    """`serve` and the setting flags as given (and `--config`); the supervisor adds the ports."""
    from service.cli.settings_flags import flags_argv

    return ["serve", *flags_argv(args, skip=("server.port", "server.metrics_port"))]


def run(args: argparse.Namespace) -> int:
    # In a process, `service.cli.main.run` has guarded it from the start already.
    return STARTUP_SIGNALS.guard(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from service.cli.settings_flags import InvalidSetting, load_from_args
    from service.config_sources import unknown_environment
    from service.errors import (
        InsecureBind,
        InvalidArgument,
        PortInUse,
        SpillDirUnusable,
        SpillTierInUse,
        StateTierUnusable,
    )
    from service.startup_checks import check_runnable

    try:
        loaded = load_from_args(args)  # flags > env > --config > defaults
        check_runnable(loaded.settings, loaded.sources)
    except InvalidSetting as exc:
        print(f"seqserve: {exc}", file=sys.stderr)  # one line, no traceback
        return 2
    settings = loaded.settings
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for warning in unknown_environment():
        log.warning("%s", warning)
    port_file: Path | None = getattr(args, "port_file", None)
    workers = getattr(args, "workers", 0) or 0
    try:
        if port_file is not None:
            check_port_file(port_file)
        if workers > 0:
            from service.cli.workers import run_workers  # no torch in the supervisor

            return run_workers(settings, worker_argv(args), workers, port_file)
        return _serve_one(settings, port_file)
    except (
        InsecureBind, InvalidArgument, PortInUse, SpillDirUnusable, SpillTierInUse,
        StateTierUnusable,
    ) as exc:  # fmt: skip
        print(f"seqserve serve: {exc.message}", file=sys.stderr)  # one line, no traceback
        return 2
    except StartupFailed as exc:  # started, then drained and stopped
        print(f"seqserve serve: {exc}", file=sys.stderr)  # one line, no traceback
        return 2


def _serve_one(settings: Settings, port_file: Path | None) -> int:
    from service.api.event_loop import run  # uvloop when installed
    from service.api.server import serve  # heavy imports only for this command
    from service.cli.workers import PortLock

    lock = None
    if settings.server.worker < 0 and settings.server.port != 0:  # workers: their supervisor's
        lock = PortLock(settings.server.port)
        lock.acquire()

    def on_started(server: SeqServeServer) -> None:
        STARTUP_SIGNALS.started(server)
        if port_file is None:
            return
        try:
            write_port_file(port_file, server)
        except OSError as exc:  # its directory went away or filled since `check_port_file`
            STARTUP_SIGNALS.fail(
                f"cannot write --port-file {port_file}: {exc.strerror or exc}; stopping"
            )

    try:
        run(STARTUP_SIGNALS.run(serve(settings, on_started)))
    finally:
        if lock is not None:
            lock.release()
    return 0

"""``odin serve --workers N``: a supervisor that runs N worker processes on one port.

The supervisor serves no clients. It opens the port (so an address in use is one clear error
before any worker starts), runs the embedded nats-server when no NATS URL is given, starts the
workers (``python -m odin serve --worker SPEC``), publishes their state for /health, /metrics
and the console, restarts one that dies (with a backoff, counted and logged), and forwards
signals: SIGTERM or SIGINT drains every worker (a second one cuts every drain short), SIGHUP
reloads every worker.

Nursery layout::

    supervisor
    ├── signal watcher
    ├── control socket (hello, workers, reload, drain)
    └── one keeper per slot: start the worker, wait for its exit, start it again

Every worker is started in a session of its own, so a Ctrl-C on the terminal reaches the
supervisor alone, which then drains the workers in order rather than each seeing SIGINT at
once; a worker whose supervisor vanishes (SIGKILL) reads EOF on its status socket and drains.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import orjson
import trio

from odin_fanout.broker.embedded import run_embedded_nats
from odin_fanout.capacity import usable_cpus
from odin_fanout.config import Config, ConfigError, ControlSection, load_config
from odin_fanout.control.host_state import METRICS_DIR, write_state
from odin_fanout.control.paths import default_directory, process_running
from odin_fanout.control.protocol import PROTOCOL_VERSION, HostWorkers, ServerIdentity, WorkerInfo
from odin_fanout.host.control import SupervisorControl
from odin_fanout.host.spec import WorkerSpec
from odin_fanout.logs import Log
from odin_fanout.metrics import forget_worker
from odin_fanout.server.app import Listening, StartError, listen_problem, open_listeners
from odin_fanout.server.control_socket import ControlUnavailable, prepare_directory
from odin_fanout.server.reload import plan_reload
from odin_fanout.server.tls import server_context
from odin_fanout.version import __version__

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
"""A worker that stayed up this long restarts, if it dies, after the shortest backoff again."""
STOP_GRACE = 10.0
"""Seconds beyond the drain timeout after which a worker that has not exited is killed."""
READY_TIMEOUT = 60.0
"""Seconds a worker may take to start listening before the start is given up."""


class WorkerStartError(Exception):
    """A worker could not start; the message says which and how it ended."""


@attrs.frozen
class Ready:
    """What a worker reports once it listens."""

    listening: Listening
    control: str
    history: str


Announce = Callable[[Ready, int], None]


@attrs.define(eq=False)
class _Slot:
    index: int
    state: str = "starting"
    pid: int | None = None
    restarts: int = 0
    since: float = attrs.Factory(time.time)
    last_exit: str = ""
    control: str = ""
    process: trio.Process | None = None
    reported: bool = False
    """Its first worker's readiness was reported to the start (nursery.start)."""

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            self.index, self.state, self.pid, self.restarts, self.since, self.last_exit,
            self.control,
        )  # fmt: skip


class Supervisor:
    def __init__(
        self,
        config: Config,
        workers: int,
        *,
        config_file: Path | None,
        overrides: dict[str, object],
        log: Log,
    ) -> None:
        self.config = config
        self.count = workers
        self._config_file = config_file
        self._overrides = dict(overrides)
        self.log = log
        self.slots = [_Slot(index) for index in range(workers)]
        self.started_at = time.time()
        self.directory = Path()
        self.stopping = False
        self.forced = False
        self._listeners: list[trio.SocketListener] = []
        self._reserved: list[socket.socket] = []
        self._reserved_ops: list[socket.socket] = []
        self._addresses: list[tuple[str, int]] = []
        self._worker_overrides: dict[str, object] = {}
        self._stop = trio.Event()
        self._all_stopped = trio.Event()
        self._websocket: list[str] = []
        self._nursery: trio.Nursery | None = None

    # ---- what others read --------------------------------------------------------------

    def state(self) -> HostWorkers:
        return HostWorkers(
            self.count, os.getpid(), self.started_at, [slot.info() for slot in self.slots]
        )

    def identity(self) -> ServerIdentity:
        pid = os.getpid()
        return ServerIdentity(
            protocol=PROTOCOL_VERSION,
            server="odin",
            version=__version__,
            instance=f"supervisor-{pid}",
            pid=pid,
            started_at=self.started_at,
            websocket=list(self._websocket),
            role="supervisor",
            workers=self.count,
            supervisor_pid=pid,
        )

    def _publish(self) -> None:
        with contextlib.suppress(OSError):
            write_state(self.directory, self.state())

    def _set(self, slot: _Slot, state: str, **changes: object) -> None:
        slot.state = state
        slot.since = time.time()
        for name, value in changes.items():
            setattr(slot, name, value)
        self._publish()

    # ---- running -----------------------------------------------------------------------

    async def run(self, announce: Announce | None = None) -> int:
        """Run until every worker has stopped; 0 after a drain, 130 when a second signal cut
        it short. Raises WorkerStartError (or StartError, EmbeddedNatsError) if it cannot
        start."""
        try:
            await self._open_port()
            self.directory = host_directory(self.config.control)
            (self.directory / METRICS_DIR).mkdir(mode=0o700)
            self._publish()
            async with self._broker() as nats_url, trio.open_nursery() as nursery:
                if nats_url is not None:
                    self._worker_overrides["nats.url"] = nats_url
                self._nursery = nursery
                nursery.start_soon(self._watch_signals)
                control = SupervisorControl(
                    self.config.control,
                    self.log,
                    state=self.state,
                    identity=self.identity,
                    reload=self.reload,
                    drain=self.drain,
                    path=Path(self.config.control.path) if self.config.control.path else None,
                )
                if self.config.control.enabled:
                    await nursery.start(control.run)
                first = await self._start_workers(nursery)
                if first is not None and not self.stopping:
                    self._websocket = first.listening.websocket
                    self.log.lifecycle().info(
                        "workers_ready",
                        workers=self.count,
                        pids=[slot.pid for slot in self.slots],
                        websocket=first.listening.websocket,
                        sockets=self.config.server.worker_sockets,
                    )
                    if announce is not None:
                        announce(first, self.count)
                await self._all_stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            for listener in self._listeners:
                listener.socket.close()
            for reserved in [*self._reserved, *self._reserved_ops]:
                reserved.close()
            if self.directory != Path():
                shutil.rmtree(self.directory, ignore_errors=True)
        return 130 if self.forced else 0

    async def _start_workers(self, nursery: trio.Nursery) -> Ready | None:
        """Start every worker at once; the first one's report (None if the stop came first).
        A worker that cannot start stops the start of the others."""
        reports: list[Ready | None] = [None] * self.count

        async def start(slot: _Slot) -> None:
            reports[slot.index] = await nursery.start(self._keep, slot)

        async with trio.open_nursery() as starting:
            for slot in self.slots:
                starting.start_soon(start, slot)
        return reports[0]

    async def _open_port(self) -> None:
        """Bind the port before any worker starts: an address in use is one error here,
        and port 0 becomes one port that every worker shares."""
        server = self.config.server
        if server.ops_address is not None:
            # Each worker listens on the ops address with SO_REUSEPORT (any of them answers
            # for the host); held here like the port, and port 0 becomes one port for all.
            reserved = reserve_port(*server.ops_address, setting="server.ops_listen")
            self._reserved_ops = reserved
            host, port = _address(reserved[0])
            shown = f"[{host}]" if ":" in host else host
            self._worker_overrides["server.ops_listen"] = f"{shown}:{port}"
        if server.worker_sockets == "shared":
            self._listeners = await open_listeners(server.host, server.port)
            return
        self._reserved = reserve_port(server.host, server.port)
        self._addresses = [_address(reserved) for reserved in self._reserved]

    @asynccontextmanager
    async def _broker(self) -> AsyncIterator[str | None]:
        """The embedded nats-server, owned here for as long as any worker runs, when the
        configuration names no NATS URL; workers connect to it as to any NATS."""
        settings = self.config.nats
        if self.config.broker.kind != "nats" or settings.url:
            yield None
            return
        async with run_embedded_nats(
            port=settings.embedded_port,
            data_dir=settings.embedded_data_dir,
            binary=settings.embedded_binary,
            log=self.log,
        ) as url:
            yield url

    # ---- one slot ----------------------------------------------------------------------

    async def _keep(self, slot: _Slot, *, task_status: trio.TaskStatus[Ready | None]) -> None:
        """Start the slot's worker and start it again whenever it dies, until the stop."""
        backoff = BACKOFF_MIN
        first = True
        if self._stop.is_set():  # stopped before this slot's turn to start
            self._stopped(slot)
            task_status.started(None)
            return
        while True:
            began = trio.current_time()
            ended = await self._run_worker(slot, task_status if first else None)
            if self._stop.is_set():
                self._stopped(slot, pid=None, last_exit=ended, control="")
                if first and not slot.reported:
                    task_status.started(None)
                return
            if trio.current_time() - began >= STABLE_AFTER:
                backoff = BACKOFF_MIN
            first = False
            forget_worker(self.directory / METRICS_DIR, slot.index)
            self._set(
                slot, "restarting", pid=None, restarts=slot.restarts + 1, last_exit=ended,
                control="",
            )  # fmt: skip
            self.log.warning(
                "worker_exited", worker=slot.index, exit=ended, restarts=slot.restarts,
                restart_in=backoff,
            )  # fmt: skip
            with trio.move_on_after(backoff):
                await self._stop.wait()
            if self._stop.is_set():
                self._stopped(slot)
                return
            backoff = min(BACKOFF_MAX, backoff * 2)

    def _stopped(self, slot: _Slot, **changes: object) -> None:
        self._set(slot, "stopped", **changes)
        if all(other.state == "stopped" for other in self.slots):
            self._all_stopped.set()

    async def _run_worker(
        self, slot: _Slot, task_status: trio.TaskStatus[Ready | None] | None
    ) -> str:
        """Run one worker process of ``slot`` to its end; how it ended, for the logs."""
        ours, theirs = socket.socketpair()
        spec = WorkerSpec(
            slot=slot.index,
            count=self.count,
            supervisor_pid=os.getpid(),
            directory=str(self.directory),
            status_fd=theirs.fileno(),
            listen_fds=[listener.socket.fileno() for listener in self._listeners],
            reuseport=list(self._addresses),
            config_file=str(self._config_file) if self._config_file else None,
            overrides=self._overrides_for(slot.index),
        )
        command = [sys.executable, "-m", "odin_fanout", "serve", "--worker", spec.encode()]
        try:
            process = await trio.lowlevel.open_process(
                command, pass_fds=[*spec.listen_fds, spec.status_fd], start_new_session=True
            )
        finally:
            theirs.close()
        status = trio.socket.from_stdlib_socket(ours)
        self._set(slot, "starting", pid=process.pid, process=process)
        self.log.info("worker_started", worker=slot.index, pid=process.pid)
        try:
            with status:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(self._await_ready, slot, status, task_status))
                    await process.wait()
                    nursery.cancel_scope.cancel()
        finally:
            slot.process = None
            if process.returncode is None:  # the supervisor itself is failing: no orphans
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            if slot.control and (process.returncode or 0) < 0:
                # Killed, it could not remove its control socket; no console should find it.
                with contextlib.suppress(OSError):
                    os.unlink(slot.control)
        ended = describe_exit(process.returncode)
        if task_status is not None and slot.state == "starting" and not self.stopping:
            raise WorkerStartError(f"worker {slot.index} {ended} before it was ready")
        return ended

    async def _await_ready(
        self,
        slot: _Slot,
        status: trio.socket.SocketType,
        task_status: trio.TaskStatus[Ready | None] | None,
    ) -> None:
        buffer = b""
        with trio.move_on_after(READY_TIMEOUT) as waiting:
            while b"\n" not in buffer:
                chunk = await status.recv(4096)
                if not chunk:
                    return  # it exited first; _run_worker reports how
                buffer += chunk
        if waiting.cancelled_caught:
            self.log.error("worker_not_ready", worker=slot.index, timeout=READY_TIMEOUT)
            if slot.process is not None:
                slot.process.kill()
            return
        report = orjson.loads(buffer.split(b"\n", 1)[0])
        ready = Ready(
            Listening(report["websocket"], report["http"], report.get("ops", [])),
            report["control"],
            report["history"],
        )
        self._set(slot, "up", control=ready.control)
        if task_status is not None:
            slot.reported = True
            task_status.started(ready)
        if self.stopping and slot.process is not None:
            slot.process.send_signal(signal.SIGTERM)  # the stop began while it started
        # Keep the socket open while the worker lives: its EOF is the worker's signal that
        # the supervisor has gone.
        await trio.sleep_forever()

    def _overrides_for(self, index: int) -> dict[str, object]:
        overrides = {**self._overrides, **self._worker_overrides}
        overrides["control.path"] = _worker_control_path(self.config.control.path, index)
        if index != 0:
            # One simulated market per host: the first worker publishes it for all.
            overrides["simulator.enabled"] = False
        return overrides

    # ---- signals and commands ----------------------------------------------------------

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    self.log.info("signal", signal=name, action="reload")
                    with contextlib.suppress(ConfigError, OSError):
                        self.reload()
                elif not self.stopping:
                    self.log.info("signal", signal=name, action="drain")
                    self.drain()
                else:
                    self.log.warning("signal", signal=name, action="exit")
                    self.forced = True
                    self._signal_workers(signal.SIGTERM)  # each worker's second signal

    def drain(self) -> None:
        """Stop: every worker drains its clients and exits."""
        if self.stopping:
            return
        self.stopping = True
        self._stop.set()
        self.log.lifecycle().info("draining", workers=self.count)
        for slot in self.slots:
            if slot.process is not None:
                self._set(slot, "stopping")
        self._signal_workers(signal.SIGTERM)
        self._kill_after(self.config.shutdown.drain_timeout + STOP_GRACE)

    def reload(self) -> tuple[list[str], list[str]]:
        """Check the configuration as every worker will, then have them reload it; raises
        ConfigError (nothing is forwarded) when it is invalid."""
        try:
            config, _ = load_config(file=self._config_file, overrides=self._overrides)
            server_context(config.server)  # the certificate every worker will read again
        except ConfigError as exc:
            self.log.warning(
                "config_reload_failed", errors=exc.problems, kept="the running configuration"
            )
            raise
        outcome = plan_reload(self.config, config)
        self.config = outcome.config
        # Only workers that are up: one still starting has no handler yet (SIGHUP would end
        # it) and reads the file as it starts anyway.
        self._signal_workers(signal.SIGHUP, only_up=True)
        self.log.lifecycle().info(
            "config_reloaded", changed=outcome.changed, restart_required=outcome.restart_required
        )
        return outcome.changed, outcome.restart_required

    def _signal_workers(self, signum: int, *, only_up: bool = False) -> None:
        for slot in self.slots:
            if only_up and slot.state != "up":
                continue
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    def _kill_after(self, seconds: float) -> None:
        """Kill the workers still running ``seconds`` from now (a drain that hangs)."""

        async def kill() -> None:
            await trio.sleep(seconds)
            for slot in self.slots:
                if slot.process is not None and slot.process.returncode is None:
                    self.log.error("worker_killed", worker=slot.index, after=seconds)
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.kill()

        if self._nursery is not None:
            self._nursery.start_soon(kill)


def describe_exit(code: int | None) -> str:
    """``exit 1`` or ``signal SIGKILL``, from a return code."""
    if code is None:
        return "running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit {code}"


def host_directory(control: ControlSection) -> Path:
    """This supervisor's directory (mode 0700) beside the control sockets, in a directory
    checked as theirs is (odin_fanout.server.control_socket); those of supervisors that are gone
    (killed before they could clean up) are removed."""
    explicit = bool(control.path)
    parent = Path(control.path).parent if explicit else default_directory()
    try:
        fd = prepare_directory(parent, os.getuid(), explicit=explicit)
    except (ControlUnavailable, OSError) as exc:
        raise StartError(f"host directory {parent}: {exc}") from None
    try:
        for stale in parent.glob("host-*"):
            pid = stale.name.removeprefix("host-")
            if pid.isdigit() and not process_running(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        name = f"host-{os.getpid()}"
        shutil.rmtree(parent / name, ignore_errors=True)  # a reused pid's leftover
        os.mkdir(name, 0o700, dir_fd=fd)
    except OSError as exc:
        raise StartError(f"host directory {parent}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return parent / name


def _worker_control_path(path: str, index: int) -> str:
    """A worker's control socket: beside an explicit supervisor path, numbered; else the
    default (odin-<pid>.sock in the control directory)."""
    if not path:
        return ""
    stem = path.removesuffix(".sock")
    return f"{stem}-{index}.sock"


def worker_count(config: Config) -> int:
    """How many workers ``server.workers`` asks for (0: one per usable core)."""
    if config.broker.kind == "memory":
        return 1
    return config.server.workers or usable_cpus()


def reserve_port(host: str, port: int, setting: str = "") -> list[socket.socket]:
    """Sockets bound (not listening) with SO_REUSEPORT on every address of ``host``: they hold
    the port, and receive no connections, while each worker binds and listens on its own."""
    reserved: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            reserved.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(reserved) > 1:
                address = (address[0], reserved[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError as exc:
        for sock in reserved:
            sock.close()
        raise StartError(listen_problem(host, port, exc, setting)) from None
    return reserved


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)

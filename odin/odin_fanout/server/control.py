"""A server process's control socket: the operator console's line-delimited JSON over a Unix
socket, answered from the server's state.

Where the socket goes, who may attach, the limits and each console's line loop are shared with
the supervisor's socket (``odin_fanout.server.control_socket``); this module says what a server
answers. Replies are bounded pages, and a console that stops reading only misses updates (the
next one carries every event since the last it got). While a console watches, an updater task
sends it a snapshot and the events since the last one every interval.

Every second, whether a console is attached or not, the rates are sampled into a ring of
the last hour (``history``), so that a console attached now charts the past hour; ``events``
pages back through the ring of recent events.

Under a supervisor (``odin serve --workers N``, ``context.worker`` set), ``hello`` names the
worker's slot, the workers expected and the supervisor, and ``workers`` answers what the
supervisor last published; a server alone answers ``workers`` ``unavailable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import trio

from odin_fanout.config import ControlSection
from odin_fanout.control.protocol import (
    HISTORY_SECONDS,
    PROTOCOL_VERSION,
    TAP_BUFFER,
    Command,
    ControlError,
    Drain,
    Draining,
    ErrorCode,
    EventPage,
    Hello,
    History,
    HostWorkers,
    Inspect,
    Kick,
    Kicked,
    ListChannels,
    ListConnections,
    ListEvents,
    Page,
    Reload,
    Reloaded,
    SlowConsumers,
    Snapshot,
    SnapshotRequest,
    Stopped,
    Tap,
    TapStarted,
    Untap,
    Unwatch,
    Update,
    Watch,
    WatchStarted,
    Workers,
    encode_tap,
    encode_update,
)
from odin_fanout.protocol.channels import ChannelError
from odin_fanout.server import control_state
from odin_fanout.server.app import OdinServer
from odin_fanout.server.control_socket import (
    AttachedConsole,
    ControlSocket,
    ControlUnavailable,
    Execute,
    peer_credentials,
    socket_path,
)
from odin_fanout.server.tap import TapFeed

__all__ = ["ControlServer", "ControlUnavailable", "peer_credentials", "socket_path"]

_EVENTS_PER_UPDATE = 500
SAMPLE_EVERY = 1.0
"""Seconds between two samples of the rates (and of the history)."""
_SNAPSHOT_REUSE = 0.25
"""Seconds a snapshot is shared between consoles instead of computed again."""
ALONE = "this server runs alone, not under a supervisor"


class ControlServer(ControlSocket):
    def __init__(
        self,
        server: OdinServer,
        config: ControlSection,
        *,
        websocket: list[str] | None = None,
        uid: int | None = None,
        reload: Callable[[], tuple[list[str], list[str]]] | None = None,
    ) -> None:
        super().__init__(config, server.context.log, uid=uid)
        self.server = server
        self.context = server.context
        self.websocket = websocket or []
        self.reload = reload
        """Applies the configuration file again, as SIGHUP: returns (changed,
        restart_required) ``section.field`` names, or raises ConfigError. None: this server
        cannot (``reload`` is answered ``unavailable``)."""
        self._rates = control_state.Rates(lambda: (server.fanout.received, server.fanout.delivered))
        self._snapshot: tuple[float, Snapshot] | None = None
        self.history = control_state.RateRing(HISTORY_SECONDS)
        """The last hour of samples, for ``history``."""

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the socket until cancelled; if it cannot be set up, log why and return
        (the console is an aid: the server goes on serving clients without it)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample_rates)
            await super().run(task_status=task_status)
            nursery.cancel_scope.cancel()

    def session(self, console: AttachedConsole) -> Execute:
        return _ServerConsole(self, console).execute

    def count_error(self, code: ErrorCode) -> None:
        self.context.metrics.control_errors.labels(code.value).inc()

    async def _sample_rates(self) -> None:
        rates = self._rates
        while True:
            await trio.sleep(SAMPLE_EVERY)
            rates.sample()
            totals = control_state.history_totals(self.context)
            self.history.add(time.time(), rates.in_per_s, rates.out_per_s, totals)

    async def snapshot(self) -> Snapshot:
        now = trio.current_time()
        if self._snapshot is None or now - self._snapshot[0] > _SNAPSHOT_REUSE:
            self._snapshot = (now, await control_state.snapshot(self.context, self._rates))
        return self._snapshot[1]

    def host(self) -> HostWorkers:
        """The supervisor's last published view of its workers."""
        worker = self.context.worker
        host = worker.host() if worker is not None else None
        if host is None:
            message = ALONE if worker is None else "the supervisor has not published its workers"
            raise ControlError(ErrorCode.UNAVAILABLE, message)
        return host


class _ServerConsole:
    """What one attached console's commands do to the server; and its watch, if any."""

    def __init__(self, control: ControlServer, console: AttachedConsole) -> None:
        self.control = control
        self.console = console
        self.watching: trio.CancelScope | None = None
        self.tapping: trio.CancelScope | None = None

    async def execute(self, command: Command) -> object:
        control = self.control
        context = control.context
        match command:
            case Hello():
                return control_state.identity(context, control.websocket, PROTOCOL_VERSION)
            case SnapshotRequest():
                return await control.snapshot()
            case Watch(interval=interval):
                self._watch(interval)
                return WatchStarted(interval)
            case Unwatch():
                if self.watching is not None:
                    self.watching.cancel()
                    self.watching = None
                return Stopped()
            case ListConnections():
                return await control_state.list_connections(context, command)
            case SlowConsumers(limit=limit):
                slow = await control_state.slow_consumers(context, limit)
                return Page(len(slow), 0, slow)
            case ListChannels():
                return control_state.list_channels(context, command)
            case Inspect(conn=conn):
                detail = control_state.inspect(context, conn)
                if detail is None:
                    raise ControlError(ErrorCode.NOT_FOUND, f"no open connection {conn!r}")
                return detail
            case Kick():
                return self._kick(command)
            case Drain():
                return self._drain()
            case Reload():
                return self._reload()
            case Workers():
                return control.host()
            case Tap():
                return self._tap(command)
            case Untap():
                if self.tapping is not None:
                    self.tapping.cancel()
                    self.tapping = None
                return Stopped()
            case History(seconds=seconds, step=step):
                return control.history.read(seconds, step, SAMPLE_EVERY)
            case ListEvents(before=before, limit=limit):
                events = context.events
                page = events.before(before, limit)
                more = bool(page) and page[0].seq > events.first
                return EventPage(page, events.first, events.last, events.capacity, more)
        raise AssertionError(f"unhandled command {command!r}")

    def _kick(self, kick: Kick) -> Kicked:
        context = self.control.context
        console = self.console
        connection = context.registry.connections.get(kick.conn)
        if connection is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"no open connection {kick.conn!r}")
        self.control.log.warning(
            "control_kick", conn=kick.conn, code=kick.code, pid=console.pid, uid=console.uid
        )
        context.events.emit("kick", kick.conn, code=kick.code, by_pid=console.pid)
        connection.request_close(kick.code, kick.reason, "operator", discard_queue=True)
        return Kicked(kick.conn, kick.code)

    def _drain(self) -> Draining:
        control = self.control
        context = control.context
        if control.server.stopping:
            raise ControlError(ErrorCode.DRAINING, "the server is already draining")
        control.log.warning("control_drain", pid=self.console.pid, uid=self.console.uid)
        context.events.emit("drain", by_pid=self.console.pid)
        control.server.request_shutdown()
        return Draining(len(context.registry.connections), context.config.shutdown.drain_timeout)

    def _reload(self) -> Reloaded:
        control = self.control
        if control.reload is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this server cannot reload its configuration")
        reloaded = self.console.reload(control.reload)
        # Every console's event log says it, not only the one that asked.
        control.context.events.emit(
            "reload",
            by_pid=self.console.pid,
            changed=", ".join(reloaded.changed),
            restart_required=", ".join(reloaded.restart_required),
        )
        return reloaded

    def _tap(self, tap: Tap) -> TapStarted:
        context = self.control.context
        connections = context.registry.connections
        if tap.conn and tap.conn not in connections:
            raise ControlError(ErrorCode.NOT_FOUND, f"no open connection {tap.conn!r}")
        if tap.channel:
            try:
                context.rules.check(tap.channel)
            except ChannelError as exc:
                raise ControlError(ErrorCode.BAD_REQUEST, f"tap: channel: {exc}") from None
        if self.tapping is not None:
            self.tapping.cancel()
        # Opened here, with no checkpoint since the lookup: the connection is still open.
        feed = context.taps.open(tap.conn, tap.channel, tap.rate, connections)
        scope = self.tapping = trio.CancelScope()
        self.console.start_soon(self._tap_lines, scope, feed)
        return TapStarted(feed.number, tap.conn, tap.channel, tap.rate, TAP_BUFFER)

    async def _tap_lines(self, scope: trio.CancelScope, feed: TapFeed) -> None:
        """Send the tap's frames as lines until it is stopped or its connection closes."""
        context = self.control.context
        skipped = context.metrics.control_tap_skipped
        try:
            with scope:
                while True:
                    await feed.wait()
                    while (line := feed.take()) is not None:
                        skipped.inc(line.skipped)
                        await self.console.send(encode_tap(line))
                    if feed.closed is not None:
                        end = feed.end_line()
                        skipped.inc(end.skipped)
                        await self.console.send(encode_tap(end))
                        return
        finally:
            context.taps.close(feed, context.registry.connections)
            if self.tapping is scope:
                self.tapping = None

    def _watch(self, interval: float) -> None:
        if self.watching is not None:
            self.watching.cancel()
        scope = self.watching = trio.CancelScope()
        self.console.start_soon(self._updates, scope, interval)

    async def _updates(self, scope: trio.CancelScope, interval: float) -> None:
        control = self.control
        events = control.context.events
        seen = events.last
        with scope:
            while True:
                await trio.sleep(interval)
                snapshot = await control.snapshot()
                # No checkpoint from here on: no event can slip between reading and marking.
                fresh, dropped = events.since(seen, _EVENTS_PER_UPDATE)
                last = events.last
                if not self.console.offer(encode_update(Update(snapshot, fresh, dropped))):
                    # The console is not reading: skip this one; the next carries the events.
                    control.context.metrics.control_updates_skipped.inc()
                    continue
                seen = last

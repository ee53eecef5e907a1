"""A fake Odin control server with invented data, for the tests and the screenshots.

It speaks the real control protocol (the same parser and encoders as the server) over a Unix
socket: it answers hello, snapshot, connections, channels, slow, inspect, kick, drain, reload,
workers, and (when its data has them, else ``unknown_command``, as an older server) history and
events from its ``FakeData``, sends updates after watch, and records every command it
received. With a supervisor's identity (``supervisor_data``) it answers as a supervisor does:
hello, workers, reload and drain, and ``unavailable`` to the rest. Nothing random is left to
chance: the data come from a seeded generator and fixed clocks, so the screenshots are the
same on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

from odin_fanout.control.protocol import (
    KICKED,
    PROTOCOL_VERSION,
    ChannelInfo,
    Command,
    ConnectionDetail,
    ConnectionInfo,
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
    NatsState,
    Page,
    RateHistory,
    Recoveries,
    Reload,
    Reloaded,
    ServerEvent,
    ServerIdentity,
    SlowConsumers,
    Snapshot,
    SnapshotRequest,
    Stopped,
    Tap,
    TapLine,
    TapStarted,
    Untap,
    Unwatch,
    Update,
    Watch,
    WatchStarted,
    WorkerInfo,
    Workers,
    encode_error,
    encode_result,
    encode_tap,
    encode_update,
    parse_request,
)

T = TypeVar("T")

BASE_TIME: Final = 1_767_261_600.0
"""2026-01-01 10:00 UTC: every invented clock starts here."""
SYMBOLS: Final = ("BTC", "ETH", "ODIN", "SOL", "DOGE", "XRP", "ADA", "AVAX", "LINK", "DOT")
KINDS: Final = ("trade", "liquidity", "metadata")

CONNECTION_KEYS: Final[dict[str, Callable[[ConnectionInfo], Any]]] = {
    "id": lambda c: int(c.id.rsplit("-", 1)[1]),
    "age": lambda c: c.age,
    "queue": lambda c: (c.queued, c.queued_age),
    "queue_age": lambda c: c.queued_age,
    "sent": lambda c: c.sent,
    "dropped": lambda c: c.dropped,
    "channels": lambda c: len(c.channels),
}
CHANNEL_KEYS: Final[dict[str, Callable[[ChannelInfo], Any]]] = {
    "name": lambda c: c.name,
    "subscribers": lambda c: c.subscribers,
    "rate": lambda c: c.rate,
    "last_seq": lambda c: c.last_seq,
    "retained": lambda c: c.retained,
}


# ---- invented data ---------------------------------------------------------------------------


def sample_snapshot(
    instance: str, tick: int = 0, *, connections: int = 812, scale: float = 1.0
) -> Snapshot:
    """A busy, mostly healthy server at step ``tick`` of a smooth daily-ish wave."""
    in_per_s, out_per_s = _rates(tick, scale)
    return Snapshot(
        time=BASE_TIME + tick,
        uptime=11_520.0 + tick,
        instance=instance,
        connections=connections,
        max_connections=10_000,
        subscriptions=connections * 2 + 16,
        channels=len(SYMBOLS) * len(KINDS),
        draining=False,
        publications=4_310_000 + 1200 * tick,
        deliveries=165_900_000 + 46_000 * tick,
        in_per_s=in_per_s,
        out_per_s=out_per_s,
        dropped={"conflated": 1_180, "slow_consumer": 23},
        gaps={"conflated": 412, "feed_overflow": 0, "missed": 3},
        slow_consumers={"closed": 2, "conflated": 57},
        rate_limited=17,
        client_errors=5,
        recoveries=Recoveries(
            recovered=318, not_recovered={"history_expired": 4, "epoch_changed": 1}, messages=9_412
        ),
        replays={"complete": 41, "incomplete": 2},
        replayed_messages=12_877,
        rejected={},
        closed={"client": 1_911, "slow_consumer": 2, "idle": 14},
        nats=NatsState(True, "connected", "e7c1", pending=3, reconnects=1, ingest_dropped=0),
        rss_bytes=212 * 1024 * 1024,
        memory_limit_bytes=1024 * 1024 * 1024,
        cpu_seconds=2_961.4,
        deepest_queue=412,
        oldest_queued_age=1.8,
    )


def _rates(tick: int, scale: float) -> tuple[float, float]:
    """Messages in and out per second at step ``tick`` of a smooth wave."""
    wave = math.sin(tick / 6) + 0.3 * math.sin(tick / 1.7)
    in_per_s = round(scale * (1200 + 380 * wave), 1)
    return in_per_s, round(in_per_s * 38.4, 1)


def sample_history(points: int, scale: float = 1.0, *, stretch: int = 1) -> RateHistory:
    """A server's last ``points`` seconds, ending at ``BASE_TIME``: the updates' wave,
    ``stretch`` times slower, with a drop now and then."""
    ticks = range(1 - points, 1)
    rates = [_rates(tick // stretch, scale) for tick in ticks]
    return RateHistory(
        interval=1.0,
        step=1,
        capacity=3600,
        time=[BASE_TIME + tick for tick in ticks],
        in_per_s=[rate[0] for rate in rates],
        out_per_s=[rate[1] for rate in rates],
        connections=[812] * points,
        dropped=[3 if tick % 60 == 0 else 0 for tick in ticks],
        gaps=[1 if tick % 60 == 0 else 0 for tick in ticks],
        recovered=[0] * points,
        not_recovered=[0] * points,
    )


def sample_connections(instance: str, count: int, seed: int = 7) -> list[ConnectionInfo]:
    rng = random.Random(seed)
    names = [f"{symbol}.{kind}" for symbol in SYMBOLS for kind in KINDS]
    items = []
    for number in range(1, count + 1):
        queued = rng.choice((0, 0, 0, 0, 1, 3, 12, 412)) if number % 5 == 0 else 0
        items.append(
            ConnectionInfo(
                id=f"{instance}-{number}",
                peer=f"10.0.{rng.randint(1, 9)}.{rng.randint(2, 250)}:{rng.randint(30000, 60000)}",
                channels=sorted(rng.sample(names, rng.randint(1, 4))),
                queued=queued,
                queued_age=round(queued * 0.004, 2) if queued else 0.0,
                sent=rng.randint(100, 400_000),
                dropped=rng.choice((0, 0, 0, 0, 2, 17)),
                age=round(rng.uniform(5, 11_000), 1),
                rate_limited=rng.choice((0, 0, 0, 1)),
            )
        )
    return items


def sample_channels(seed: int = 7) -> list[ChannelInfo]:
    rng = random.Random(seed)
    return [
        ChannelInfo(
            name=f"{symbol}.{kind}",
            subscribers=rng.randint(3, 400),
            rate=round(rng.uniform(0.5, 140), 1),
            last_seq=rng.randint(10_000, 4_000_000),
            retained=rng.choice((1000, 1000, 1000, 640, 87)),
        )
        for symbol in SYMBOLS
        for kind in KINDS
    ]


def sample_events(instance: str, count: int = 14) -> list[ServerEvent]:
    """Every kind of event the log shows, in a plausible order."""
    kinds: list[tuple[str, dict[str, str | int | float | bool | None]]] = [
        ("conn_open", {"peer": "10.0.3.17:51022"}),
        ("recover", {"channel": "BTC.trade", "outcome": "recovered"}),
        ("slow_consumer", {"action": "conflated"}),
        ("rate_limited", {}),
        ("conn_close", {"code": 1000, "reason": "", "why": "client"}),
        (
            "recover",
            {"channel": "ETH.liquidity", "outcome": "not_recovered", "reason": "history_expired"},
        ),
        ("conn_close", {"code": 1008, "reason": "slow consumer", "why": "slow_consumer"}),
        ("kick", {"code": KICKED, "by_pid": 5120}),
    ]
    events = []
    for seq in range(1, count + 1):
        kind, detail = kinds[(seq - 1) % len(kinds)]
        events.append(
            ServerEvent(
                seq=seq,
                time=BASE_TIME - 60 + 4.5 * seq,
                kind=kind,
                conn=f"{instance}-{100 + seq * 7}",
                detail=dict(detail),
            )
        )
    return events


@attrs.define
class FakeData:
    """What a fake server says; tests change it and then push an update."""

    identity: ServerIdentity
    snapshot: Snapshot
    connections: list[ConnectionInfo]
    channels: list[ChannelInfo]
    events: list[ServerEvent] = attrs.Factory(list)
    """Sent with the next update, then forgotten."""
    tick: int = 0
    scale: float = 1.0
    """Of the invented rates."""
    reload: Reloaded | list[str] | None = attrs.Factory(lambda: Reloaded([], []))
    """What ``reload`` answers: a result, the problems of a bad configuration
    (``config_invalid``), or None (``unavailable``)."""
    workers: HostWorkers | None = None
    """What ``workers`` answers (None: ``unavailable``, a server alone)."""
    history: RateHistory | None = None
    """What ``history`` answers (None: ``unknown_command``, as a server older than it)."""
    ring: list[ServerEvent] | None = None
    """The events ``events`` pages through, oldest first (None: ``unknown_command``)."""
    ring_capacity: int = 2000

    @property
    def supervisor(self) -> bool:
        return self.identity.role == "supervisor"


def demo_data(
    instance: str = "a3f9",
    pid: int = 4242,
    *,
    connections: int = 240,
    seed: int = 7,
    scale: float = 1.0,
    protocol: int = PROTOCOL_VERSION,
) -> FakeData:
    identity = ServerIdentity(
        protocol=protocol,
        server="odin",
        version="0.1.0",
        instance=instance,
        pid=pid,
        started_at=BASE_TIME - 11_520,
        websocket=["ws://0.0.0.0:3002/ws"],
    )
    return FakeData(
        identity=identity,
        snapshot=sample_snapshot(instance, connections=connections, scale=scale),
        connections=sample_connections(instance, connections, seed),
        channels=sample_channels(seed),
        events=sample_events(instance),
        scale=scale,
    )


def worker_data(
    instance: str, pid: int, slot: int, *, count: int, supervisor_pid: int, **options: Any
) -> FakeData:
    """A worker of ``odin serve --workers count``: a server whose hello names its host."""
    data = demo_data(instance, pid, **options)
    data.identity = attrs.evolve(
        data.identity, worker=slot, workers=count, supervisor_pid=supervisor_pid
    )
    return data


def supervisor_data(pid: int, workers: list[WorkerInfo]) -> FakeData:
    """A supervisor reporting ``workers``; it serves no clients, so it has no snapshot to
    give (the one kept here is never sent)."""
    data = demo_data("", pid, connections=0)
    data.identity = attrs.evolve(
        data.identity, role="supervisor", websocket=[], workers=len(workers)
    )
    data.events = []
    data.workers = HostWorkers(len(workers), pid, BASE_TIME - 11_520, workers)
    return data


# ---- the server ------------------------------------------------------------------------------


class FakeServer:
    """A control server on ``path`` answering from ``data``.

    ``history`` updates (invented, one tick apart) are sent right after ``watch``, so that the
    sparklines have a past; with ``auto`` an update follows every interval, else only when
    ``push`` is called. ``deny`` answers every request with ``permission_denied`` and hangs up,
    as a server does to a peer of another user.
    """

    def __init__(
        self,
        path: Path,
        data: FakeData,
        *,
        deny: bool = False,
        history: int = 0,
        auto: bool = False,
    ) -> None:
        self.path = path
        self.data = data
        self.deny = deny
        self.history = history
        self.auto = auto
        self.received: list[Command] = []
        self._server: asyncio.Server | None = None
        self._watchers: dict[asyncio.StreamWriter, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def commands(self, kind: type[T]) -> list[T]:
        return [command for command in self.received if isinstance(command, kind)]

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def stop(self) -> None:
        """Stop listening and hang up on every client; the socket file stays, as after a
        crash."""
        if self._server is not None:
            self._server.close()
            self._server = None
        # Hanging up ends each connection's task at its next read (cancelling one would make
        # asyncio log it as a failed client callback).
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        self._watchers.clear()

    async def push(self) -> None:
        """Send an update with the current snapshot and the pending events to every watcher."""
        update = Update(self.data.snapshot, self.data.events)
        self.data.events = []
        await self._broadcast(encode_update(update))

    async def _broadcast(self, line: bytes) -> None:
        for writer in list(self._watchers):
            with contextlib.suppress(ConnectionError):
                writer.write(line)
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        ticker: asyncio.Task[None] | None = None
        try:
            while line := await reader.readline():
                try:
                    request_id, command = parse_request(line)
                except ControlError as exc:
                    writer.write(encode_error(exc.request_id, exc.code, exc.message))
                    continue
                self.received.append(command)
                if self.deny:
                    writer.write(encode_error(request_id, ErrorCode.PERMISSION_DENIED, "uid 1001"))
                    await writer.drain()
                    break
                writer.write(self._answer(request_id, command, writer))
                await writer.drain()
                if isinstance(command, Watch):
                    await self._send_history(writer)
                    if self.auto and ticker is None:
                        ticker = asyncio.create_task(self._tick(writer, command.interval))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            self._watchers.pop(writer, None)
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _send_history(self, writer: asyncio.StreamWriter) -> None:
        data = self.data
        for step in range(self.history):
            tick = step - self.history + 1
            snapshot = attrs.evolve(data.snapshot, **_wave(tick, data.scale))
            events = data.events if step == self.history - 1 else []
            writer.write(encode_update(Update(snapshot, events)))
        if self.history:
            data.events = []
            await writer.drain()
        else:
            await self.push()

    async def _tick(self, writer: asyncio.StreamWriter, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.data.tick += 1
            self.data.snapshot = attrs.evolve(
                self.data.snapshot, **_wave(self.data.tick, self.data.scale)
            )
            update = Update(self.data.snapshot, self.data.events)
            self.data.events = []
            writer.write(encode_update(update))
            await writer.drain()

    def _answer(self, request_id: object, command: Command, writer: asyncio.StreamWriter) -> bytes:
        data = self.data
        if data.supervisor and not isinstance(command, Hello | Workers | Reload | Drain):
            message = "a supervisor serves no clients; its workers' control sockets do"
            return encode_error(request_id, ErrorCode.UNAVAILABLE, message)
        match command:
            case Hello():
                return encode_result(request_id, data.identity)
            case Workers():
                if data.workers is None:
                    message = "this server runs alone, not under a supervisor"
                    return encode_error(request_id, ErrorCode.UNAVAILABLE, message)
                return encode_result(request_id, data.workers)
            case SnapshotRequest():
                return encode_result(request_id, data.snapshot)
            case Watch(interval=interval):
                self._watchers[writer] = interval
                return encode_result(request_id, WatchStarted(interval))
            case Unwatch():
                self._watchers.pop(writer, None)
                return encode_result(request_id, Stopped())
            case ListConnections():
                return encode_result(request_id, connections_page(data.connections, command))
            case ListChannels():
                return encode_result(request_id, channels_page(data.channels, command))
            case SlowConsumers(limit=limit):
                slowest = sorted(data.connections, key=CONNECTION_KEYS["queue"], reverse=True)
                return encode_result(request_id, slowest[:limit])
            case Inspect(conn=conn):
                found = self._find(conn)
                if found is None:
                    return encode_error(request_id, ErrorCode.NOT_FOUND, f"no connection {conn}")
                detail = ConnectionDetail(found, "https://app.example", 2048, [], 3)
                return encode_result(request_id, detail)
            case Kick(conn=conn, code=code, reason=reason):
                found = self._find(conn)
                if found is None:
                    return encode_error(request_id, ErrorCode.NOT_FOUND, f"no connection {conn}")
                data.connections.remove(found)
                now = data.snapshot.time
                data.events += [
                    ServerEvent(0, now, "kick", conn, {"code": code, "by_pid": 5120}),
                    ServerEvent(
                        0,
                        now,
                        "conn_close",
                        conn,
                        {"code": code, "reason": reason, "why": "operator"},
                    ),
                ]
                return encode_result(request_id, Kicked(conn, code))
            case Drain():
                if data.snapshot.draining:
                    return encode_error(request_id, ErrorCode.DRAINING, "already draining")
                data.snapshot = attrs.evolve(data.snapshot, draining=True)
                if data.supervisor:
                    return encode_result(request_id, Draining(0, 0.0))
                data.events.append(
                    ServerEvent(0, data.snapshot.time, "drain", "", {"by_pid": 5120})
                )
                return encode_result(request_id, Draining(len(data.connections), 30.0))
            case Reload():
                return self._reload(request_id)
            case Tap(conn="", channel=channel, rate=rate):
                # The reply, then a frame of the channel to each of this server's connections.
                frames = [
                    TapLine(1, BASE_TIME + 1, info.id, '{"seq":41}', 10, channel=channel, seq=41)
                    for info in data.connections
                ]
                tail = b"".join(encode_tap(frame) for frame in frames)
                return encode_result(request_id, TapStarted(1, "", channel, rate, 256)) + tail
            case Tap(conn=conn, rate=rate):
                if self._find(conn) is None:
                    return encode_error(request_id, ErrorCode.NOT_FOUND, f"no connection {conn}")
                # The reply, then the frames the connection got (invented).
                frames = [
                    TapLine(1, BASE_TIME, conn, '{"type":"subscription_ack"}', 27),
                    TapLine(1, BASE_TIME + 1, conn, '{"seq":41}', 10, channel="BTC.trade", seq=41),
                ]
                tail = b"".join(encode_tap(frame) for frame in frames)
                return encode_result(request_id, TapStarted(1, conn, "", rate, 256)) + tail
            case Untap():
                return encode_result(request_id, Stopped())
            case History():
                if data.history is None:
                    return _older_server(request_id, "history")
                return encode_result(request_id, data.history)
            case ListEvents(before=before, limit=limit):
                if data.ring is None:
                    return _older_server(request_id, "events")
                return encode_result(request_id, events_page(data, before, limit))
        raise AssertionError(f"unanswered {command!r}")

    def _reload(self, request_id: object) -> bytes:
        """As the server: an error changes nothing; a reload is an event for every console."""
        outcome = self.data.reload
        if outcome is None:
            message = "this server cannot reload its configuration"
            return encode_error(request_id, ErrorCode.UNAVAILABLE, message)
        if isinstance(outcome, list):
            return encode_error(request_id, ErrorCode.CONFIG_INVALID, "; ".join(outcome))
        detail: dict[str, str | int | float | bool | None] = {
            "by_pid": 5120,
            "changed": ", ".join(outcome.changed),
            "restart_required": ", ".join(outcome.restart_required),
        }
        self.data.events.append(ServerEvent(0, self.data.snapshot.time, "reload", "", detail))
        return encode_result(request_id, outcome)

    def _find(self, conn: str) -> ConnectionInfo | None:
        return next((c for c in self.data.connections if c.id == conn), None)


def _older_server(request_id: object, name: str) -> bytes:
    """What a server older than the command answers."""
    message = f"unknown cmd {name!r}"
    return encode_error(request_id, ErrorCode.UNKNOWN_COMMAND, message)


def events_page(data: FakeData, before: int, limit: int) -> EventPage:
    """As the server's ring: the newest ``limit`` events before ``before`` (0: the newest)."""
    ring = data.ring or []
    older = [event for event in ring if not before or event.seq < before]
    page = older[-limit:]
    first, last = (ring[0].seq, ring[-1].seq) if ring else (0, 0)
    more = bool(page) and page[0].seq > first
    return EventPage(page, first, last, data.ring_capacity, more)


def _wave(tick: int, scale: float) -> dict[str, Any]:
    """A snapshot's clock and rates at step ``tick``."""
    in_per_s, out_per_s = _rates(tick, scale)
    return {"time": BASE_TIME + tick, "in_per_s": in_per_s, "out_per_s": out_per_s}


def connections_page(items: list[ConnectionInfo], query: ListConnections) -> Page[ConnectionInfo]:
    needle = query.filter.lower()
    kept = [
        c
        for c in items
        if not needle
        or needle in c.id.lower()
        or needle in c.peer.lower()
        or needle in c.user.lower()
        or any(needle in name.lower() for name in c.channels)
    ]
    kept.sort(key=CONNECTION_KEYS[query.sort], reverse=query.descending)
    return Page(len(kept), query.offset, kept[query.offset : query.offset + query.limit])


def channels_page(items: list[ChannelInfo], query: ListChannels) -> Page[ChannelInfo]:
    needle = query.filter.lower()
    kept = [c for c in items if needle in c.name.lower()]
    kept.sort(key=CHANNEL_KEYS[query.sort], reverse=query.descending)
    return Page(len(kept), query.offset, kept[query.offset : query.offset + query.limit])

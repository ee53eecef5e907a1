"""What the control socket reports: a snapshot of the server, pages of its connections and
channels, one connection in detail. Walks over the connections go in chunks of ``CHUNK`` with
a checkpoint between them, and a listing keeps only the best ``offset + limit`` as it goes (a
heap), so however many connections there are the fan-out never waits for more than one chunk.
Replies are bounded: a page, a top-K.
"""

from __future__ import annotations

import heapq
import os
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import trio

from odin_fanout.capacity import rss_bytes
from odin_fanout.control.protocol import (
    ChannelInfo,
    ConnectionDetail,
    ConnectionInfo,
    ListChannels,
    ListConnections,
    NatsState,
    Page,
    RateHistory,
    Recoveries,
    ServerIdentity,
    Snapshot,
)
from odin_fanout.metrics import (
    CLOSE_REASONS,
    GAP_REASONS,
    REJECT_REASONS,
)
from odin_fanout.server.connection import Connection
from odin_fanout.server.context import ServerContext
from odin_fanout.version import __version__

CHUNK = 250
"""Connections looked at between two checkpoints."""
RATE_WINDOW = 10.0
"""Seconds over which a channel's publication rate is measured."""


def identity(context: ServerContext, websocket: list[str], protocol: int) -> ServerIdentity:
    """Who this process is; under a supervisor, also its slot, the workers expected and the
    supervisor (the console groups a host's workers by it)."""
    worker = context.worker
    return ServerIdentity(
        protocol=protocol,
        server="odin",
        version=__version__,
        instance=context.instance,
        pid=os.getpid(),
        started_at=context.started_at,
        websocket=websocket,
        role="server",
        worker=worker.slot if worker is not None else None,
        workers=worker.count if worker is not None else 1,
        supervisor_pid=worker.supervisor_pid if worker is not None else None,
    )


class Rates:
    """Publications in and deliveries out per second, from samples about a second apart."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self._read = read
        self._last = (trio.current_time(), *read())
        self.in_per_s = 0.0
        self.out_per_s = 0.0

    def sample(self) -> None:
        now = trio.current_time()
        received, delivered = self._read()
        then, received_before, delivered_before = self._last
        elapsed = now - then
        if elapsed > 0:
            self.in_per_s = (received - received_before) / elapsed
            self.out_per_s = (delivered - delivered_before) / elapsed
        self._last = (now, received, delivered)


_HISTORY_METRICS = (
    "odin_deliveries_dropped_total",
    "odin_gaps_total",
    "odin_recoveries_total",
)


def history_totals(context: ServerContext) -> tuple[int, int, int, int, int]:
    """What a history sample records besides the rates: open connections, then the totals
    since start of drops, gaps, recoveries and failed recoveries (all reasons added)."""
    totals = dict.fromkeys(_HISTORY_METRICS, 0.0)
    not_recovered = 0.0
    for (name, labels), count in context.metrics.samples(_HISTORY_METRICS).items():
        if name == "odin_recoveries_total" and labels[:1] == ("not_recovered",):
            not_recovered += count
        elif name in totals:
            totals[name] += count
    return (
        len(context.registry.connections),
        int(totals["odin_deliveries_dropped_total"]),
        int(totals["odin_gaps_total"]),
        int(totals["odin_recoveries_total"]),
        int(not_recovered),
    )


class RateRing:
    """The last ``capacity`` samples (one a second: the last hour at 3600) of the rates, the
    open connections, and the drops, gaps and recoveries since the previous sample.

    Fixed size: eight preallocated arrays of 8-byte numbers, 64 bytes a sample (230,400
    bytes at 3600), written in place; nothing grows with time or traffic."""

    _FLOATS = ("time", "in_per_s", "out_per_s")
    _COUNTS = ("connections", "dropped", "gaps", "recovered", "not_recovered")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._floats = {name: array("d", bytes(8 * capacity)) for name in self._FLOATS}
        self._counts = {name: array("q", bytes(8 * capacity)) for name in self._COUNTS}
        self._next = 0
        self._count = 0
        self._totals: tuple[int, int, int, int] | None = None
        """The previous sample's totals of drops, gaps, recovered, not recovered."""

    def __len__(self) -> int:
        return self._count

    def add(
        self, when: float, in_per_s: float, out_per_s: float, totals: tuple[int, int, int, int, int]
    ) -> None:
        """Record a sample: ``totals`` as ``history_totals`` gives them."""
        connections, *counters = totals
        now = (counters[0], counters[1], counters[2], counters[3])
        before = self._totals if self._totals is not None else now
        self._totals = now
        # A counter never goes back; max() keeps a reset (a test's registry) from going below 0.
        deltas = [max(0, after - then) for after, then in zip(now, before, strict=True)]
        index = self._next
        rates = (round(in_per_s, 2), round(out_per_s, 2))  # as the snapshot says them
        for name, value in zip(self._FLOATS, (when, *rates), strict=True):
            self._floats[name][index] = value
        for name, count in zip(self._COUNTS, (connections, *deltas), strict=True):
            self._counts[name][index] = count
        self._next = (index + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def read(self, seconds: int, step: int, interval: float) -> RateHistory:
        """The newest ``seconds`` samples, oldest first, merged ``step`` at a time (the
        oldest point may merge fewer: points end on the newest sample). Slices of the
        columns, not a Python loop per sample: it holds the event loop once, briefly."""
        kept = min(seconds, self._count)
        start = (self._next - kept) % self.capacity
        cut = start + kept - self.capacity

        def ordered(column: array[Any]) -> list[Any]:
            if cut <= 0:
                return column[start : start + kept].tolist()
            return column[start:].tolist() + column[:cut].tolist()

        floats = {name: ordered(column) for name, column in self._floats.items()}
        counts = {name: ordered(column) for name, column in self._counts.items()}
        ends = list(range(kept, 0, -step))[::-1]
        spans = [(max(0, end - step), end) for end in ends]

        def mean(values: list[float]) -> list[float]:
            if step == 1:
                return values
            return [round(sum(values[lo:hi]) / (hi - lo), 2) for lo, hi in spans]

        def total(values: list[int]) -> list[int]:
            return values if step == 1 else [sum(values[lo:hi]) for lo, hi in spans]

        def last(values: list[Any]) -> list[Any]:
            return values if step == 1 else [values[end - 1] for end in ends]

        return RateHistory(
            interval=interval,
            step=step,
            capacity=self.capacity,
            time=last(floats["time"]),
            in_per_s=mean(floats["in_per_s"]),
            out_per_s=mean(floats["out_per_s"]),
            connections=last(counts["connections"]),
            dropped=total(counts["dropped"]),
            gaps=total(counts["gaps"]),
            recovered=total(counts["recovered"]),
            not_recovered=total(counts["not_recovered"]),
        )


_SNAPSHOT_METRICS = (
    "odin_publications_received_total",
    "odin_deliveries_total",
    "odin_deliveries_dropped_total",
    "odin_gaps_total",
    "odin_slow_consumers_total",
    "odin_rate_limited_messages_total",
    "odin_client_errors_total",
    "odin_recoveries_total",
    "odin_recovered_messages_total",
    "odin_replays_total",
    "odin_replayed_messages_total",
    "odin_connections_rejected_total",
    "odin_connections_closed_total",
)


async def chunks(context: ServerContext) -> AsyncIterator[list[Connection]]:
    """The open connections, a chunk at a time, with a checkpoint after each chunk."""
    everyone = list(context.registry.connections.values())
    for start in range(0, len(everyone), CHUNK):
        yield everyone[start : start + CHUNK]
        await trio.lowlevel.checkpoint()


async def snapshot(context: ServerContext, rates: Rates) -> Snapshot:
    deepest, oldest = 0, None
    async for chunk in chunks(context):
        for connection in chunk:
            writer = connection.writer
            deepest = max(deepest, writer.queued_messages)
            queued_at = writer.oldest_queued_at()
            if queued_at is not None and (oldest is None or queued_at < oldest):
                oldest = queued_at
    samples = context.metrics.samples(_SNAPSHOT_METRICS)

    def value(name: str, *labels: str) -> int:
        return int(samples.get((name, labels), 0))

    def by(name: str, labels: Iterable[str]) -> dict[str, int]:
        return {label: value(name, label) for label in labels}

    not_recovered = {
        labels[1]: int(count)
        for (name, labels), count in samples.items()
        if name == "odin_recoveries_total" and labels[0] == "not_recovered"
    }
    broker = context.broker
    status, stats = broker.status(), broker.stats()
    now = trio.current_time()
    times = os.times()
    return Snapshot(
        time=time.time(),
        uptime=time.time() - context.started_at,
        instance=context.instance,
        connections=len(context.registry.connections),
        max_connections=context.registry.max_connections,
        subscriptions=context.hub.subscriptions,
        channels=context.reader.window.channel_count(),
        draining=context.registry.draining,
        publications=value("odin_publications_received_total"),
        deliveries=value("odin_deliveries_total"),
        in_per_s=round(rates.in_per_s, 2),
        out_per_s=round(rates.out_per_s, 2),
        dropped={  # conflated, slow_consumer, and why any other close dropped events
            labels[0]: int(count)
            for (name, labels), count in samples.items()
            if name == "odin_deliveries_dropped_total"
        },
        gaps=by("odin_gaps_total", GAP_REASONS),
        slow_consumers=by("odin_slow_consumers_total", ("closed", "conflated")),
        rate_limited=value("odin_rate_limited_messages_total"),
        client_errors=sum(
            int(count) for (name, _), count in samples.items() if name == "odin_client_errors_total"
        ),
        recoveries=Recoveries(
            recovered=value("odin_recoveries_total", "recovered", "none"),
            not_recovered=not_recovered,
            messages=value("odin_recovered_messages_total"),
        ),
        replays=by("odin_replays_total", ("complete", "incomplete")),
        replayed_messages=value("odin_replayed_messages_total"),
        rejected=by("odin_connections_rejected_total", REJECT_REASONS),
        closed=by("odin_connections_closed_total", CLOSE_REASONS),
        nats=NatsState(
            connected=status.connected,
            detail=status.detail,
            epoch=context.reader.epoch,
            pending=stats.pending,
            reconnects=stats.reconnects,
            ingest_dropped=stats.ingest_dropped,
        ),
        rss_bytes=rss_bytes() or 0,
        memory_limit_bytes=context.registry.capacity.limits.memory_bytes or 0,
        cpu_seconds=round(times.user + times.system, 3),
        deepest_queue=deepest,
        oldest_queued_age=round(now - oldest, 3) if oldest is not None else 0.0,
    )


def connection_info(connection: Connection, now: float) -> ConnectionInfo:
    writer = connection.writer
    queued_at = writer.oldest_queued_at()
    return ConnectionInfo(
        id=connection.id,
        peer=connection.peer,
        channels=sorted(connection.session.subscriptions),
        queued=writer.queued_messages,
        queued_age=round(now - queued_at, 3) if queued_at is not None else 0.0,
        sent=connection.delivered,
        dropped=connection.dropped,
        age=round(now - connection.opened_at, 3),
        rate_limited=connection.rate_limited,
        closing=connection.closing is not None,
        user=connection.session.grant.subject,
    )


def _connection_key(sort: str, now: float) -> Callable[[Connection], Any]:
    def queue_age(connection: Connection) -> float:
        queued_at = connection.writer.oldest_queued_at()
        return now - queued_at if queued_at is not None else 0.0

    keys: dict[str, Callable[[Connection], Any]] = {
        "id": lambda c: (c.id.rsplit("-", 1)[0], int(c.id.rsplit("-", 1)[1])),
        "age": lambda c: now - c.opened_at,
        "queue": lambda c: c.writer.queued_messages,
        "queue_age": queue_age,
        "sent": lambda c: c.delivered,
        "dropped": lambda c: c.dropped,
        "channels": lambda c: len(c.session.subscriptions),
    }
    return keys[sort]


def _matches(connection: Connection, text: str) -> bool:
    return (
        text in connection.id
        or text in connection.peer
        or text in connection.session.grant.subject
        or any(text in channel for channel in connection.session.subscriptions)
    )


async def list_connections(
    context: ServerContext, request: ListConnections
) -> Page[ConnectionInfo]:
    """One page of the connections in the requested order. The page is selected chunk by
    chunk (a heap of offset + limit), never by sorting every connection at once."""
    now = trio.current_time()
    key = _connection_key(request.sort, now)
    select = heapq.nlargest if request.descending else heapq.nsmallest
    wanted = request.offset + request.limit
    best: list[tuple[Any, int, Connection]] = []
    total = 0
    async for chunk in chunks(context):
        keyed = []
        for connection in chunk:
            if not request.filter or _matches(connection, request.filter):
                # The running count breaks ties, so connections are never compared.
                keyed.append((key(connection), total, connection))
                total += 1
        best = select(wanted, best + keyed)
    page = best[request.offset : wanted]
    return Page(total, request.offset, [connection_info(c, now) for *_, c in page])


async def slow_consumers(context: ServerContext, limit: int) -> list[ConnectionInfo]:
    """The connections with the most queued frames, then the oldest queued frame; only
    those with something queued."""
    now = trio.current_time()
    age = _connection_key("queue_age", now)
    top: list[tuple[tuple[int, float], int, Connection]] = []
    async for chunk in chunks(context):
        queued = [c for c in chunk if c.writer.queued_messages]
        candidates = top + [((c.writer.queued_messages, age(c)), id(c), c) for c in queued]
        top = heapq.nlargest(limit, candidates, key=lambda item: item[0])
    return [connection_info(c, now) for *_, c in top]


def inspect(context: ServerContext, conn: str) -> ConnectionDetail | None:
    connection = context.registry.connections.get(conn)
    if connection is None:
        return None
    return ConnectionDetail(
        connection=connection_info(connection, trio.current_time()),
        origin=connection.origin,
        queued_bytes=connection.writer.queued_bytes,
        recovering=sorted(connection.seam.held_channels()),
        subscriptions=len(connection.session.subscriptions),
    )


def list_channels(context: ServerContext, request: ListChannels) -> Page[ChannelInfo]:
    """Channels in the history window and channels subscribed by name."""
    now = trio.current_time()
    names = set(context.reader.window.channels())
    names.update(context.hub.exact_keys())
    if request.filter:
        names = {name for name in names if request.filter in name}
    channels = []
    for name in names:
        retained, last_seq, recent = context.reader.window.channel_stats(name, now, RATE_WINDOW)
        channels.append(
            ChannelInfo(
                name=name,
                subscribers=context.hub.count_matching(name),
                rate=round(recent / RATE_WINDOW, 2),
                last_seq=last_seq,
                retained=retained,
            )
        )
    channels.sort(key=lambda c: getattr(c, request.sort), reverse=request.descending)
    page = channels[request.offset : request.offset + request.limit]
    return Page(len(channels), request.offset, page)

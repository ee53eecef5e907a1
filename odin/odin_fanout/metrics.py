"""The server's Prometheus metrics, defined once, on a registry of their own.

A registry per server (not the process-global one) lets tests run several servers in one
process and read each one's numbers. Hot paths count once per broadcast, not once per
delivery (an ``inc`` costs about 0.3 µs; a delivery about 5 µs), and labelled children are
resolved once here rather than on every event.

Under ``odin serve --workers N`` the workers share their metrics through prometheus-client's
multiprocess mode (``share_between_workers``): every value lives in a memory-mapped file of
the host directory, so whichever worker answers ``/metrics`` returns the host's totals, and a
value written just before a SIGKILL is not lost. The files are named by worker *slot*, not pid
(the library's default): a restarted worker reopens its predecessor's file and its counters
go on from there, so they never go back and the directory never grows. What other modes read
at scrape time from live objects (the broker's counters, the queues, the process) a worker
copies into such values every second (``sync``); a series per worker carries a ``worker``
label.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from odin_fanout.broker.base import BrokerStats
from odin_fanout.capacity import read_limits, rss_bytes
from odin_fanout.control.protocol import ErrorCode as ControlErrorCode
from odin_fanout.control.protocol import HostWorkers, WorkerInfo
from odin_fanout.core.recovery import Reason
from odin_fanout.version import __version__

# Counters would also export a *_created series each; Prometheus does not need them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

REJECT_REASONS = (
    "at_capacity",
    "draining",
    "origin",
    "handshake_timeout",
    "bad_request",
    "unauthorized",
    "per_ip",
    "ip_rate",
    "per_subject",
    "address_table",
    "proxy_header",
    "tls",
)
AUTH_REFUSALS = (
    "missing",
    "malformed",
    "algorithm",
    "unknown_key",
    "invalid_signature",
    "expired",
    "not_yet_valid",
    "audience",
    "issuer",
    "invalid",
    "forbidden",
    "token_expired",
    "auth_timeout",
)
"""Why a token, or what it asked for, was refused (``odin_auth_refused_total{reason}``):
the first ten at the upgrade (401), ``forbidden`` a subscribe or replay outside what the
connection may read, ``token_expired`` an open connection closed at its token's expiry."""
HTTP_PUBLISH_RESULTS = (
    "ok",
    "unauthorized",
    "forbidden",
    "invalid",
    "too_large",
    "rate_limited",
    "broker_error",
)
"""How ``POST /api/publish`` requests ended (``odin_http_publish_total{result}``)."""
GAP_REASONS = (
    "conflated",
    "missed",
    "feed_overflow",
    "recovery_overflow",
    "invalid_payload",
    "payload_too_large",
)
HISTORY_EVICTION_REASONS = ("max_bytes", "max_messages", "max_age", "max_channels")
CLOSE_REASONS = (
    "client",
    "slow_consumer",
    "rate_limit",
    "idle",
    "message_too_big",
    "protocol_error",
    "shutdown",
    "operator",
    "error",
    "token_expired",
    "auth",
)


def share_between_workers(directory: Path, slot: int) -> None:
    """Make every metric created from now on in this process a value in ``directory`` that
    all the host's workers read (call it first thing in a worker, before any Metrics)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue(lambda: slot)  # type: ignore[no-untyped-call]


def forget_worker(directory: Path, slot: int) -> None:
    """After worker ``slot`` died: its gauges no longer count (its counters stay, for its
    successor to go on from)."""
    prometheus_client.multiprocess.mark_process_dead(slot, str(directory))  # type: ignore[no-untyped-call]


@attrs.frozen
class Shared:
    """Where the host's workers keep their metrics, and what the supervisor publishes."""

    directory: Path
    slot: int
    host: Callable[[], HostWorkers | None]


class Metrics:
    def __init__(self, shared: Shared | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._before_scrape: list[Callable[[], None]] = []
        self._shared = shared
        self._mirrors: list[Callable[[], None]] = []
        """Copy live readings into shared values (``sync``); only under a supervisor."""
        self._walks: list[Callable[[], None]] = []
        """Those of them that walk every connection or descriptor."""
        r = self.registry
        self.registry.register(_LimitsCollector())
        if shared is None:
            ProcessCollector(registry=r)
            # The same series as a host of workers exports: a lone process is a host of one.
            self.registry.register(_HostCollector(_alone))
        else:
            self._walks.append(_ProcessMirror(r, shared.slot))
            self._exposition = CollectorRegistry(auto_describe=False)
            self._exposition.register(_SharedCollector(shared.directory))
            self._exposition.register(_LimitsCollector())
            self._exposition.register(_HostCollector(shared.host))

        self.connections_active = Gauge(
            "odin_connections_active",
            "Open WebSocket connections.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Counter(
            "odin_connections", "WebSocket connections accepted.", registry=r
        )
        self.sse_streams = Gauge(
            "odin_sse_streams_active",
            "Open Server-Sent Events streams (counted in odin_connections_active too).",
            registry=r,
            multiprocess_mode="livesum",
        )
        rejected = Counter(
            "odin_connections_rejected",
            "Connection attempts refused before or during the upgrade, by reason.",
            ["reason"],
            registry=r,
        )
        self.rejected = {reason: rejected.labels(reason) for reason in REJECT_REASONS}
        self.admission_evictions = Counter(
            "odin_admission_evictions",
            "Client addresses forgotten early because admission.max_addresses were tracked "
            "(each gets a full new-connection bucket again).",
            registry=r,
        )
        auth_refused = Counter(
            "odin_auth_refused",
            "Tokens refused at the upgrade (401), requests outside what a connection may read, "
            "and connections closed at their token's expiry, by reason.",
            ["reason"],
            registry=r,
        )
        self.auth_refused = {reason: auth_refused.labels(reason) for reason in AUTH_REFUSALS}
        jwks_fetches = Counter(
            "odin_auth_jwks_fetches",
            "Fetches of the JWKS document at auth.jwks_url, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.jwks_fetches = {result: jwks_fetches.labels(result) for result in ("ok", "error")}
        http_publish = Counter(
            "odin_http_publish",
            "Requests to POST /api/publish, by result (ok, unauthorized, forbidden, invalid, "
            "too_large, rate_limited, broker_error).",
            ["result"],
            registry=r,
        )
        self.http_publish = {result: http_publish.labels(result) for result in HTTP_PUBLISH_RESULTS}
        self.jwks_age = Gauge(
            "odin_auth_jwks_age_seconds",
            "Seconds since the last good fetch of auth.jwks_url (since the start before the "
            "first one); 0 without a JWKS URL.",
            registry=r,
            multiprocess_mode="livemax",
        )
        closed = Counter(
            "odin_connections_closed",
            "Connections that ended, by why they ended.",
            ["reason"],
            registry=r,
        )
        self.closed = {reason: closed.labels(reason) for reason in CLOSE_REASONS}
        self.connections_max = Gauge(
            "odin_connections_max",
            "The connection limit (the host's, over every worker).",
            registry=r,
            multiprocess_mode="livesum",
        )

        self.frames_received = Counter(
            "odin_client_messages_received", "Data frames received from clients.", registry=r
        )
        self.bytes_received = Counter(
            "odin_client_received_bytes", "Payload bytes received from clients.", registry=r
        )
        self.frames_sent = Counter(
            "odin_client_messages_sent",
            "Frames handed to client sockets (events, replays and replies).",
            registry=r,
        )
        self.bytes_sent = Counter(
            "odin_client_sent_bytes",
            "Bytes of event frames handed to client sockets, WebSocket framing included.",
            registry=r,
        )
        self.publications = Counter(
            "odin_publications_received",
            "Publications received from the broker feed.",
            registry=r,
        )
        self.deliveries = Counter(
            "odin_deliveries",
            "Event deliveries to subscribers (one publication to N subscribers counts N).",
            registry=r,
        )
        self.deliveries_dropped = Counter(
            "odin_deliveries_dropped",
            "Event deliveries not made, by reason: conflated (replaced by a newer message of "
            "the same channel), or why the connection was closed with them still queued (as "
            "odin_connections_closed_total: slow_consumer, idle, operator, rate_limit, ...).",
            ["reason"],
            registry=r,
        )
        self.dropped_conflated = self.deliveries_dropped.labels("conflated")
        self.deliveries_dropped.labels("slow_consumer")  # shown at 0 from the start
        slow = Counter(
            "odin_slow_consumers",
            "Times a connection's outbound queue filled, by the action taken.",
            ["action"],
            registry=r,
        )
        self.slow_closed = slow.labels("closed")
        self.slow_conflated = slow.labels("conflated")
        self.rate_limited = Counter(
            "odin_rate_limited_messages",
            "Client frames dropped by the per-connection token bucket.",
            registry=r,
        )
        self.bad_messages = Counter(
            "odin_client_errors",
            "Client frames refused with an error reply, by code.",
            ["code"],
            registry=r,
        )
        self.recoveries = Counter(
            "odin_recoveries",
            "Recovery attempts on subscribe, per channel, by outcome (recovered, "
            "not_recovered) and reason.",
            ["outcome", "reason"],
            registry=r,
        )
        # Every outcome exists from the start, so rates and ratios have data before the
        # first failure (and alerts can be evaluated).
        self.recoveries.labels("recovered", "none")
        for why in Reason:
            self.recoveries.labels("not_recovered", why.value)
        self.recovered_messages = Counter(
            "odin_recovered_messages", "Messages replayed by successful recoveries.", registry=r
        )
        self.replays = Counter(
            "odin_replays", "Replay requests, by outcome.", ["outcome"], registry=r
        )
        for outcome in ("complete", "incomplete"):
            self.replays.labels(outcome)
        self.replayed_messages = Counter(
            "odin_replayed_messages", "Messages sent in answer to replay requests.", registry=r
        )
        gaps = Counter(
            "odin_gaps",
            "Gap notices sent to clients, by reason (conflated: the slow-consumer policy "
            "dropped messages; missed or feed_overflow: the server never received them; "
            "recovery_overflow: too many arrived during a recovery).",
            ["reason"],
            registry=r,
        )
        self.gaps = {reason: gaps.labels(reason) for reason in GAP_REASONS}
        self.refused_publications = Counter(
            "odin_refused_publications",
            "Publications not delivered, by reason (invalid_payload: not JSON; "
            "payload_too_large: over broker.max_payload); clients get a gap notice instead.",
            ["reason"],
            registry=r,
        )
        for reason in ("invalid_payload", "payload_too_large"):
            self.refused_publications.labels(reason)
        Gauge(
            "odin_build_info",
            "Always 1; the running version in a label.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        ).labels(__version__).set(1)
        self.control_errors = Counter(
            "odin_control_errors",
            "Error replies the control socket sent to consoles, by code (permission_denied and "
            "too_many_clients refuse a console; the others refuse one request).",
            ["code"],
            registry=r,
        )
        for code in ControlErrorCode:
            self.control_errors.labels(code.value)
        self.control_updates_skipped = Counter(
            "odin_control_updates_skipped",
            "Watch updates not sent because the console was not reading (the next one carries "
            "the events).",
            registry=r,
        )
        self.control_tap_skipped = Counter(
            "odin_control_tap_skipped",
            "Tapped frames not sent to the console: beyond the tap's rate, or its buffer full "
            "(the next tap line counts them).",
            registry=r,
        )
        self.history_reads = Counter(
            "odin_history_reads",
            "Reads of the broker's history for recovery and replay, by result (shared: "
            "answered by a read already in flight for the same range).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error", "shared"):
            self.history_reads.labels(result)
        self.latency = Histogram(
            "odin_delivery_latency_seconds",
            "From the broker storing a publication (its timestamp) to handing it to the "
            "sockets of every subscriber (the last one included); only publications with "
            "subscribers.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.subscriptions = Gauge(
            "odin_subscriptions_active",
            "Subscriptions held by open connections.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.channels = Gauge(
            "odin_history_channels",
            "Channels in the server's history window (each worker keeps the same window).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.history_bytes = Gauge(
            "odin_history_bytes",
            "Bytes held by the history windows (frames, bodies and their objects; bounded by "
            "history.max_bytes in each process; the host's workers add up).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.history_evicted = Counter(
            "odin_history_evicted",
            "Messages that left the history window, by the bound that dropped them "
            "(max_bytes, max_messages, max_age, max_channels: with their channel).",
            ["reason"],
            registry=r,
        )
        for reason in HISTORY_EVICTION_REASONS:
            self.history_evicted.labels(reason)

        self.interest_filters = Gauge(
            "odin_interest_filters",
            "Channels and patterns this process takes from the broker (-1: every channel).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.interest_changes = Counter(
            "odin_interest_changes",
            "Times this process changed what it takes from the broker.",
            registry=r,
        )

        self.duplicates = Counter(
            "odin_duplicate_publications",
            "Publications ignored because their position was already delivered.",
            registry=r,
        )

    def before_scrape(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before each exposition (to bring counts kept elsewhere up to date)."""
        self._before_scrape.append(callback)

    def sync(self, *, walk: bool = True) -> None:
        """Bring every count kept elsewhere up to date. The server's housekeeping calls it
        every second, so that under a supervisor another worker's scrape sees this one's
        counts at most a second old; the readings that walk every connection or descriptor
        (queue depths, open files) only when ``walk`` (every WALK_EVERY seconds, and for
        this worker's own scrape): profiled, at 5,000 connections a worker they were half
        of its idle CPU when taken every second."""
        for callback in self._before_scrape:
            callback()
        for mirror in self._mirrors:
            mirror()
        if walk:
            for mirror in self._walks:
                mirror()

    def watch_broker(self, stats: Callable[[], BrokerStats]) -> None:
        """Export the broker's own counters, read from it at each scrape."""
        if self._shared is None:
            self.registry.register(_BrokerCollector(stats))
        else:
            self._mirrors.append(_BrokerMirror(stats, self.registry))

    def watch_queues(self, queues: Callable[[], Iterable[tuple[int, float | None]]],
                     now: Callable[[], float]) -> None:  # fmt: skip
        """Export how full the connections' outbound queues are, read at each scrape:
        ``queues`` gives each open connection's queued frames and when its oldest was
        queued (on the clock ``now`` reads)."""
        if self._shared is None:
            self.registry.register(_QueueCollector(queues, now))
        else:
            self._walks.append(_QueueMirror(queues, now, self.registry))

    def samples(self, names: Iterable[str]) -> dict[tuple[str, tuple[str, ...]], float]:
        """The samples of the metrics called ``names`` (as exposed: ``odin_x_total``), by
        (name, label values), for the control socket. Only their collectors run: not the
        process collector, nor the queue collector that walks every connection."""
        for callback in self._before_scrape:
            callback()
        return {
            (sample.name, tuple(sample.labels.values())): sample.value
            for metric in self.registry.restricted_registry(list(names)).collect()
            for sample in metric.samples
        }

    def render(self, accept_header: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for, and its content type."""
        encoder, content_type = choose_encoder(accept_header or "")
        if self._shared is None:
            for callback in self._before_scrape:
                callback()
            return encoder(self.registry), content_type
        self.sync()
        return encoder(self._exposition), content_type


# (metric name, BrokerStats field, help): counters the broker keeps and Prometheus reads.
_BROKER_COUNTERS = (
    ("odin_broker_reconnects", "reconnects", "Reconnections to the broker."),
    ("odin_broker_disconnects", "disconnects", "Connections to the broker lost."),
    ("odin_broker_ingested", "ingested", "Publications received from the broker."),
    (
        "odin_broker_ingest_dropped",
        "ingest_dropped",
        "Publications the feed dropped because the fan-out fell behind (announced as gaps).",
    ),
    (
        "odin_broker_bad_subjects",
        "bad_subjects",
        "Messages on subjects that are not odin.token.SYMBOL.event.",
    ),
    (
        "odin_broker_discontinuities",
        "discontinuities",
        "Times messages left the broker's history before this process read them.",
    ),
    (
        "odin_broker_resumes",
        "resumes",
        "Times delivery of the broker's history restarted after the last message read.",
    ),
    ("odin_broker_history_reads", "history_reads", "Reads of the broker's history."),
    ("odin_broker_published", "published", "Publications the broker acknowledged."),
    ("odin_broker_publish_failed", "publish_failed", "Publications that failed."),
    (
        "odin_broker_publish_retries",
        "publish_retries",
        "Publications sent again after a failed or missing acknowledgement.",
    ),
    (
        "odin_broker_publish_dropped",
        "publish_dropped",
        "Publications given up after retrying past their bound (also in publish_failed).",
    ),
)


_CONNECTED_HELP = "1 while the broker is connected."
_PENDING_HELP = "Messages in the broker's history not yet delivered to this process (ingest lag)."


class _BrokerCollector(Collector):
    def __init__(self, stats: Callable[[], BrokerStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("odin_broker_connected", _CONNECTED_HELP, int(stats.connected))
        yield GaugeMetricFamily("odin_broker_pending_messages", _PENDING_HELP, stats.pending)
        for name, field, text in _BROKER_COUNTERS:
            yield CounterMetricFamily(name, text, getattr(stats, field))


class _BrokerMirror:
    """The broker's counters as shared counters (summed over workers, each of which reads
    the stream itself), and its state per worker."""

    def __init__(self, stats: Callable[[], BrokerStats], registry: CollectorRegistry) -> None:
        self._stats = stats
        self._connected = Gauge(
            "odin_broker_connected", _CONNECTED_HELP, registry=registry,
            multiprocess_mode="liveall",
        )  # fmt: skip
        self._pending = Gauge(
            "odin_broker_pending_messages", _PENDING_HELP, registry=registry,
            multiprocess_mode="liveall",
        )  # fmt: skip
        self._counters = [
            (Counter(name.removesuffix("_total"), text, registry=registry), field)
            for name, field, text in _BROKER_COUNTERS
        ]
        self._seen = dict.fromkeys((field for _, field, _ in _BROKER_COUNTERS), 0)

    def __call__(self) -> None:
        stats = self._stats()
        self._connected.set(int(stats.connected))
        self._pending.set(stats.pending)
        for counter, field in self._counters:
            value = getattr(stats, field)
            counter.inc(max(0, value - self._seen[field]))
            self._seen[field] = value


QUEUE_DEPTH_BUCKETS = (0, 1, 10, 100, 1000)
WALK_EVERY = 5
"""Seconds between the readings that walk every connection, under a supervisor."""


class _QueueCollector(Collector):
    """Queue depth over all connections as a gauge histogram (how many connections have at
    most N frames queued), and the worst connection's depth and oldest frame age: bounded
    however many connections there are, never one series per connection."""

    def __init__(
        self, queues: Callable[[], Iterable[tuple[int, float | None]]], now: Callable[[], float]
    ) -> None:
        self._queues = queues
        self._now = now

    def collect(self) -> Iterable[Metric]:
        queues = _QueueReading.of(self._queues(), self._now())
        yield GaugeHistogramMetricFamily(
            "odin_connection_queue_depth",
            _DEPTH_HELP,
            buckets=queues.buckets,
            gsum_value=queues.total,
        )
        yield GaugeMetricFamily("odin_connection_queue_depth_max", _DEEPEST_HELP, queues.deepest)
        yield GaugeMetricFamily("odin_connection_queue_age_max_seconds", _AGE_HELP, queues.age)


_DEPTH_HELP = "Open connections by frames waiting in their outbound queue."
_DEEPEST_HELP = "Frames queued on the connection with the most."
_AGE_HELP = "Age of the oldest frame waiting in any connection's outbound queue (0: none)."


@attrs.frozen
class _QueueReading:
    buckets: list[tuple[str, float]]
    """Cumulative: connections with at most ``le`` frames queued."""
    total: int
    deepest: int
    age: float

    @classmethod
    def of(cls, queues: Iterable[tuple[int, float | None]], now: float) -> _QueueReading:
        counts = [0] * (len(QUEUE_DEPTH_BUCKETS) + 1)
        total = deepest = 0
        oldest: float | None = None
        for depth, queued_at in queues:
            total += depth
            deepest = max(deepest, depth)
            if queued_at is not None and (oldest is None or queued_at < oldest):
                oldest = queued_at
            for index, bound in enumerate(QUEUE_DEPTH_BUCKETS):
                if depth <= bound:
                    counts[index] += 1
                    break
            else:
                counts[-1] += 1
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip((*map(str, QUEUE_DEPTH_BUCKETS), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        age = max(0.0, now - oldest) if oldest is not None else 0.0
        return cls(buckets, total, deepest, age)


class _QueueMirror:
    """The queue gauges as shared values: the same series names (``_bucket`` by ``le``,
    ``_gsum``), summed over workers, the worst of them for the maxima."""

    def __init__(
        self,
        queues: Callable[[], Iterable[tuple[int, float | None]]],
        now: Callable[[], float],
        registry: CollectorRegistry,
    ) -> None:
        self._queues = queues
        self._now = now
        self._buckets = Gauge(
            "odin_connection_queue_depth_bucket", _DEPTH_HELP, ["le"], registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self._total = Gauge(
            "odin_connection_queue_depth_gsum", _DEPTH_HELP, registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self._deepest = Gauge(
            "odin_connection_queue_depth_max", _DEEPEST_HELP, registry=registry,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self._age = Gauge(
            "odin_connection_queue_age_max_seconds", _AGE_HELP, registry=registry,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self._connections = Gauge(
            "odin_worker_connections", "Open WebSocket connections of each worker.",
            registry=registry, multiprocess_mode="liveall",
        )  # fmt: skip

    def __call__(self) -> None:
        queues = list(self._queues())
        self._connections.set(len(queues))
        reading = _QueueReading.of(queues, self._now())
        for le, count in reading.buckets:
            self._buckets.labels(le).set(count)
        self._total.set(reading.total)
        self._deepest.set(reading.deepest)
        self._age.set(reading.age)


class _ProcessMirror:
    """The process metrics a dashboard reads (``process_cpu_seconds_total``,
    ``process_resident_memory_bytes``), summed over the host's workers, and per worker."""

    def __init__(self, registry: CollectorRegistry, slot: int) -> None:
        self._cpu = Counter("process_cpu_seconds", "CPU time of the workers.", registry=registry)
        self._rss = Gauge(
            "process_resident_memory_bytes", "Resident memory of the workers.",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self._fds = Gauge(
            "process_open_fds", "Open file descriptors of the workers.",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        Gauge(
            "process_max_fds", "File descriptors each worker may open (the lowest limit).",
            registry=registry, multiprocess_mode="livemin",
        ).set(resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # fmt: skip
        Gauge(
            "process_start_time_seconds", "Start time of the oldest worker (Unix time).",
            registry=registry, multiprocess_mode="livemin",
        ).set(time.time())  # fmt: skip
        self._worker_cpu = Counter(
            "odin_worker_cpu_seconds", "CPU time of each worker.", ["worker"], registry=registry
        ).labels(str(slot))
        self._worker_rss = Gauge(
            "odin_worker_resident_memory_bytes", "Resident memory of each worker.",
            registry=registry, multiprocess_mode="liveall",
        )  # fmt: skip
        self._cpu_seen = 0.0

    def __call__(self) -> None:
        used = time.process_time()
        self._cpu.inc(used - self._cpu_seen)
        self._worker_cpu.inc(used - self._cpu_seen)
        self._cpu_seen = used
        rss = rss_bytes() or 0
        self._rss.set(rss)
        self._worker_rss.set(rss)
        with contextlib.suppress(OSError):
            self._fds.set(len(os.listdir("/proc/self/fd")))


class _SharedCollector(Collector):
    """Every worker's values from the host directory, merged as the multiprocess mode does;
    the per-process label (the library's ``pid``, here the worker's slot) is named
    ``worker``."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = [str(path) for path in self._directory.glob("*.db")]
        merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        depth: dict[str, Metric] = {}
        stream = _stream_counters(files)
        for metric in merged:
            if metric.name in stream:
                metric.samples = stream[metric.name]
            metric.samples = [
                sample._replace(labels={_WORKER.get(k, k): v for k, v in sample.labels.items()})
                for sample in metric.samples
            ]
            if metric.name in _DEPTH_PARTS:
                depth[metric.name] = metric
            else:
                yield metric
        if depth:
            yield _depth_histogram(depth)


STREAM_COUNTERS = ("odin_publications_received", "odin_broker_ingested")
"""Counts of the stream itself, which every worker reads whole: the host's figure is the
highest worker's, not the sum (a sum would grow with the number of workers). Each slot's
count never goes back, so neither does their maximum."""


def _stream_counters(files: list[str]) -> dict[str, list[Sample]]:
    best: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for path in files:
        if not os.path.basename(path).startswith("counter_"):
            continue
        for metric in MultiProcessCollector.merge([path], accumulate=True):  # type: ignore[no-untyped-call]
            if metric.name not in STREAM_COUNTERS:
                continue
            samples = best.setdefault(metric.name, {})
            for sample in metric.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples or sample.value > samples[key].value:
                    samples[key] = sample
    return {name: list(samples.values()) for name, samples in best.items()}


def _depth_histogram(parts: dict[str, Metric]) -> Metric:
    """The queue-depth gauge histogram again, from the two gauges that share it (the
    multiprocess files hold no gauge histograms)."""
    buckets = parts.get("odin_connection_queue_depth_bucket")
    total = parts.get("odin_connection_queue_depth_gsum")
    counts = {s.labels["le"]: s.value for s in buckets.samples} if buckets else {}
    order = [*map(str, QUEUE_DEPTH_BUCKETS), "+Inf"]
    return GaugeHistogramMetricFamily(
        "odin_connection_queue_depth",
        _DEPTH_HELP,
        buckets=[(le, counts.get(le, 0.0)) for le in order],
        gsum_value=total.samples[0].value if total and total.samples else 0.0,
    )


_DEPTH_PARTS = ("odin_connection_queue_depth_bucket", "odin_connection_queue_depth_gsum")
_WORKER = {"pid": "worker"}


def _alone() -> HostWorkers:
    return HostWorkers(1, os.getpid(), time.time(), [WorkerInfo(0, "up")])


class _HostCollector(Collector):
    """The workers as the supervisor last published them."""

    def __init__(self, host: Callable[[], HostWorkers | None]) -> None:
        self._host = host

    def collect(self) -> Iterable[Metric]:
        host = self._host()
        if host is None:
            return
        yield GaugeMetricFamily(
            "odin_workers_expected", "Workers the host should run.", host.expected
        )
        yield GaugeMetricFamily("odin_workers_up", "Workers serving clients.", host.up)
        restarts = CounterMetricFamily(
            "odin_worker_restarts",
            "Times a worker died and was started again, by slot.",
            labels=["worker"],
        )
        for worker in host.workers:
            restarts.add_metric([str(worker.slot)], worker.restarts)
        yield restarts


class _LimitsCollector(Collector):
    """The memory and CPU this process may use (its cgroup's limits, else the machine's
    memory), read at each scrape so that a limit changed at run time shows."""

    def collect(self) -> Iterable[Metric]:
        limits = read_limits()
        if limits.memory_bytes is not None:
            yield GaugeMetricFamily(
                "odin_memory_limit_bytes",
                "Memory the process may use: its cgroup limit, else the machine's memory.",
                limits.memory_bytes,
            )
        if limits.cpu_cores is not None:
            yield GaugeMetricFamily(
                "odin_cpu_limit_cores",
                "CPU the process's cgroup may use, in cores (absent: no quota).",
                limits.cpu_cores,
            )

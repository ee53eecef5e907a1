"""The server's Prometheus metrics, defined once, on a registry of their own.

A registry per server (not the process-global one) lets tests run several servers in one
process and read each one's numbers. Hot paths count once per broadcast, not once per
delivery (an ``inc`` costs about 0.3 µs; a delivery about 5 µs), and labelled children are
resolved once here rather than on every event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from odin import __version__
from odin.broker.base import BrokerStats
from odin.capacity import read_limits
from odin.control.protocol import ErrorCode as ControlErrorCode
from odin.core.recovery import Reason

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
)
GAP_REASONS = (
    "conflated",
    "missed",
    "feed_overflow",
    "recovery_overflow",
    "invalid_payload",
    "payload_too_large",
)
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
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._before_scrape: list[Callable[[], None]] = []
        ProcessCollector(registry=self.registry)
        self.registry.register(_LimitsCollector())
        r = self.registry

        self.connections_active = Gauge(
            "odin_connections_active", "Open WebSocket connections.", registry=r
        )
        self.connections = Counter(
            "odin_connections", "WebSocket connections accepted.", registry=r
        )
        rejected = Counter(
            "odin_connections_rejected",
            "Connection attempts refused before or during the upgrade, by reason.",
            ["reason"],
            registry=r,
        )
        self.rejected = {reason: rejected.labels(reason) for reason in REJECT_REASONS}
        closed = Counter(
            "odin_connections_closed",
            "Connections that ended, by why they ended.",
            ["reason"],
            registry=r,
        )
        self.closed = {reason: closed.labels(reason) for reason in CLOSE_REASONS}
        self.connections_max = Gauge(
            "odin_connections_max", "The configured connection limit.", registry=r
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
        dropped = Counter(
            "odin_deliveries_dropped",
            "Event deliveries not made, by reason (conflated: replaced by a newer message "
            "of the same channel; slow_consumer: the connection was closed as slow).",
            ["reason"],
            registry=r,
        )
        self.dropped_conflated = dropped.labels("conflated")
        self.dropped_slow = dropped.labels("slow_consumer")
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
            "odin_subscriptions_active", "Subscriptions held by open connections.", registry=r
        )
        self.channels = Gauge(
            "odin_history_channels", "Channels in the server's history window.", registry=r
        )
        self.duplicates = Counter(
            "odin_duplicate_publications",
            "Publications ignored because their position was already delivered.",
            registry=r,
        )

    def before_scrape(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before each exposition (to bring counts kept elsewhere up to date)."""
        self._before_scrape.append(callback)

    def watch_broker(self, stats: Callable[[], BrokerStats]) -> None:
        """Export the broker's own counters, read from it at each scrape."""
        self.registry.register(_BrokerCollector(stats))

    def watch_queues(self, queues: Callable[[], Iterable[tuple[int, float | None]]],
                     now: Callable[[], float]) -> None:  # fmt: skip
        """Export how full the connections' outbound queues are, read at each scrape:
        ``queues`` gives each open connection's queued frames and when its oldest was
        queued (on the clock ``now`` reads)."""
        self.registry.register(_QueueCollector(queues, now))

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
        for callback in self._before_scrape:
            callback()
        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self.registry), content_type


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
)


class _BrokerCollector(Collector):
    def __init__(self, stats: Callable[[], BrokerStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "odin_broker_connected", "1 while the broker is connected.", int(stats.connected)
        )
        yield GaugeMetricFamily(
            "odin_broker_pending_messages",
            "Messages in the broker's history not yet delivered to this process (ingest lag).",
            stats.pending,
        )
        for name, field, text in _BROKER_COUNTERS:
            yield CounterMetricFamily(name, text, getattr(stats, field))


QUEUE_DEPTH_BUCKETS = (0, 1, 10, 100, 1000)


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
        counts = [0] * (len(QUEUE_DEPTH_BUCKETS) + 1)
        total = deepest = 0
        oldest: float | None = None
        for depth, queued_at in self._queues():
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
        yield GaugeHistogramMetricFamily(
            "odin_connection_queue_depth",
            "Open connections by frames waiting in their outbound queue.",
            buckets=buckets,
            gsum_value=total,
        )
        yield GaugeMetricFamily(
            "odin_connection_queue_depth_max",
            "Frames queued on the connection with the most.",
            deepest,
        )
        yield GaugeMetricFamily(
            "odin_connection_queue_age_max_seconds",
            "Age of the oldest frame waiting in any connection's outbound queue (0: none).",
            max(0.0, self._now() - oldest) if oldest is not None else 0.0,
        )


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

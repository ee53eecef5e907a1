"""State shared by the server's tasks: one object, passed down, never a module global."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import attrs
import trio

from odin_fanout.broker.base import Broker
from odin_fanout.capacity import plan, read_limits
from odin_fanout.config import Config
from odin_fanout.core.hub import Hub
from odin_fanout.logs import Log
from odin_fanout.metrics import Metrics
from odin_fanout.protocol.access import AccessRules, rules_from
from odin_fanout.protocol.channels import ChannelRules
from odin_fanout.protocol.session import SessionLimits
from odin_fanout.server.endpoints import CpuSampler
from odin_fanout.server.events import EventRing
from odin_fanout.server.expiry import Expiries
from odin_fanout.server.history_reads import HistoryReader
from odin_fanout.server.interest import InterestKeeper
from odin_fanout.server.jwks import JwksSource
from odin_fanout.server.liveness import Wheel
from odin_fanout.server.registry import Registry
from odin_fanout.server.tap import Taps
from odin_fanout.server.tls import TlsHolder
from odin_fanout.server.tokens import Verifier
from odin_fanout.server.worker_role import WorkerRole
from odin_fanout.server.writer import Flusher

if TYPE_CHECKING:
    from odin_fanout.server.connection import Connection


@attrs.define(eq=False)
class ServerContext:
    config: Config
    broker: Broker
    metrics: Metrics
    log: Log
    hub: Hub[Connection] = attrs.Factory(Hub)
    reader: HistoryReader = attrs.field(init=False)
    """The window of recent events, its epoch, and reads of the broker's history."""
    interest: InterestKeeper = attrs.field(init=False)
    """What this process takes from the broker, kept to what its clients subscribe to."""
    registry: Registry = attrs.field(init=False)
    """Who is connected, and the connection limit."""
    instance: str = attrs.Factory(lambda: secrets.token_hex(3))
    """Distinguishes this process's connection ids from other processes'."""
    events: EventRing = attrs.Factory(EventRing)
    """Recent connection events, for the control socket's watchers."""
    taps: Taps = attrs.Factory(Taps)
    """The control socket's live taps (odin_fanout.server.tap): none, nearly always."""
    started_at: float = attrs.Factory(time.time)
    flusher: Flusher = attrs.Factory(Flusher)
    """Writers with frames queued since their last flush (flushed once per fan-out batch)."""
    liveness: Wheel = attrs.field(init=False)
    """Pings and idle deadlines of every connection, from one task."""
    cpu: CpuSampler = attrs.Factory(CpuSampler)
    """This process's recent CPU use, for /health."""
    rules: ChannelRules = attrs.field(init=False)
    access: AccessRules = attrs.field(init=False)
    """Which channels need a token, or are not served (``auth.namespaces``)."""
    jwks: JwksSource = attrs.field(init=False)
    """The keys of ``auth.jwks_url``, fetched and refreshed by its task (idle without one)."""
    verifier: Verifier = attrs.field(init=False)
    """Checks connection tokens (``auth``)."""
    expiries: Expiries = attrs.field(init=False)
    """Closes connections when their token expires."""
    limits: SessionLimits = attrs.field(init=False)
    tls: TlsHolder = attrs.field(init=False)
    """The client listener's TLS context (``server.tls_cert``), swapped by a reload."""
    worker: WorkerRole | None = None
    """Set when this process is one of a supervisor's workers (``--workers N``)."""

    def __attrs_post_init__(self) -> None:
        self.reader = HistoryReader(self.config, self.broker, self.metrics, self.log)
        self.interest = InterestKeeper(self)
        self.liveness = Wheel(self.config.connection.ping_interval)
        self.rules = ChannelRules()
        self.access = rules_from(self.config.auth.namespaces)
        self.jwks = JwksSource(self.config.auth, self.metrics, self.log)
        self.verifier = Verifier.from_config(
            self.config.auth, self.jwks.keys if self.config.auth.jwks_url else None
        )
        self.expiries = Expiries(self.config.auth.leeway, self.config.auth.expiry_notice)
        self.limits = session_limits(self.config)
        self.tls = TlsHolder(self.config.server)
        worker = self.worker
        capacity = plan(
            self.config.server.max_connections,
            read_limits(),
            history_bytes=self.config.history.max_bytes,
            workers=worker.count if worker else 1,
            slot=worker.slot if worker else 0,
        )
        self.registry = Registry(capacity, self.metrics)
        self.metrics.watch_broker(self.broker.stats)
        self.metrics.watch_queues(self._queues, trio.current_time)

    def _queues(self) -> list[tuple[int, float | None]]:
        return [
            (connection.writer.queued_messages, connection.writer.oldest_queued_at())
            for connection in self.registry.connections.values()
        ]


def session_limits(config: Config) -> SessionLimits:
    """The protocol rules every connection lives by, from the configuration."""
    connection = config.connection
    return SessionLimits(
        max_subscriptions=connection.max_subscriptions,
        rate_burst=connection.rate_limit_burst,
        rate_per_second=connection.rate_limit_per_second,
        abuse_threshold=connection.rate_limit_abuse_threshold,
        idle_timeout=connection.idle_timeout,
    )

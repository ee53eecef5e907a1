"""State shared by the server's tasks: one object, passed down, never a module global."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import attrs
import trio

from odin.broker.base import Broker
from odin.capacity import Capacity, plan, read_limits
from odin.config import Config
from odin.core.history import HistoryLog
from odin.core.hub import Hub
from odin.logs import Log
from odin.metrics import Metrics
from odin.protocol.channels import ChannelRules
from odin.protocol.session import SessionLimits
from odin.server.endpoints import CpuSampler
from odin.server.events import EventRing

if TYPE_CHECKING:
    from odin.server.connection import Connection
    from odin.server.fanout import Event
    from odin.server.history_reads import SharedRead


@attrs.define(eq=False)
class ServerContext:
    config: Config
    broker: Broker
    metrics: Metrics
    log: Log
    hub: Hub[Connection] = attrs.Factory(Hub)
    history: HistoryLog[Event] = attrs.field(init=False)
    connections: dict[str, Connection] = attrs.Factory(dict)
    """Open connections by id (registered after the upgrade, removed at close)."""
    admitted: int = 0
    """Connections counted against the limit: registered or past admission in the upgrade."""
    instance: str = attrs.Factory(lambda: secrets.token_hex(3))
    """Distinguishes this process's connection ids from other processes'."""
    epoch: str = ""
    """The epoch of the last publication the fan-out handled."""
    draining: bool = False
    changed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    """Unparked whenever a connection opens or closes."""
    reads: dict[tuple[str, int, int], SharedRead] = attrs.Factory(dict)
    """History reads in flight, by (channel, after, limit), shared by identical requests."""
    events: EventRing = attrs.Factory(EventRing)
    """Recent connection events, for the control socket's watchers."""
    started_at: float = attrs.Factory(time.time)
    cpu: CpuSampler = attrs.Factory(CpuSampler)
    """This process's recent CPU use, for /health."""
    capacity: Capacity = attrs.field(init=False)
    """The connection limit in force, and the limits it was derived from."""
    rules: ChannelRules = attrs.field(init=False)
    limits: SessionLimits = attrs.field(init=False)

    @property
    def max_connections(self) -> int:
        return self.capacity.max_connections

    def __attrs_post_init__(self) -> None:
        history = self.config.history
        self.history = HistoryLog(
            max_messages=history.max_messages,
            max_age=history.max_age,
            max_channels=history.max_channels,
        )
        self.rules = ChannelRules()
        self.limits = session_limits(self.config)
        self.capacity = plan(self.config.server.max_connections, read_limits())
        self.metrics.connections_max.set(self.capacity.max_connections)
        self.metrics.watch_broker(self.broker.stats)
        self.metrics.watch_queues(self._queues, trio.current_time)

    def _queues(self) -> list[tuple[int, float | None]]:
        return [
            (connection.writer.queued_messages, connection.writer.oldest_queued_at())
            for connection in self.connections.values()
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

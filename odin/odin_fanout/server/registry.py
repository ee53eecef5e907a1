"""Who is connected: admission against the connection limit, and the open connections.

A place is taken synchronously when an upgrade passes admission (so two concurrent upgrades
cannot both take the last one), kept by the connection once it is registered, and given back
exactly once: by the upgrade if it fails, by the connection when it closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from odin_fanout.capacity import Capacity
from odin_fanout.metrics import Metrics

if TYPE_CHECKING:
    from odin_fanout.server.connection import Connection


class Registry:
    def __init__(self, capacity: Capacity, metrics: Metrics) -> None:
        self.capacity = capacity
        """The connection limit in force, and the limits it was derived from."""
        self._metrics = metrics
        self.connections: dict[str, Connection] = {}
        """Open connections by id (registered after the upgrade, removed at close)."""
        self.admitted = 0
        """Places taken: registered connections and upgrades past admission."""
        self.draining = False
        self.changed = trio.lowlevel.ParkingLot()
        """Unparked whenever a connection opens or closes."""
        metrics.connections_max.set(capacity.max_connections)

    @property
    def max_connections(self) -> int:
        return self.capacity.max_connections

    @property
    def full(self) -> bool:
        return self.admitted >= self.capacity.max_connections

    def set_capacity(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self._metrics.connections_max.set(capacity.max_connections)

    def admit(self) -> None:
        """Take a place for an upgrade that passed admission."""
        self.admitted += 1

    def release(self) -> None:
        """Give back the place of an upgrade that never became a connection."""
        self.admitted -= 1

    def add(self, connection: Connection) -> None:
        self.connections[connection.id] = connection
        self._metrics.connections.inc()
        self._metrics.connections_active.inc()
        self.changed.unpark_all()

    def remove(self, connection: Connection) -> None:
        """Forget a closed connection and give back its place (once)."""
        if self.connections.pop(connection.id, None) is not None:
            self._metrics.connections_active.dec()
            self.admitted -= 1
            self.changed.unpark_all()

    async def wait(self, condition: Callable[[int], bool]) -> None:
        """Wait until ``condition(number of open connections)`` holds."""
        while not condition(len(self.connections)):
            await self.changed.park()

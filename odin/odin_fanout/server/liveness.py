"""Heartbeats and idle deadlines for every connection, from one task.

Each connection sits in one slot of a wheel that turns one slot a second; a full turn takes
the ping interval. When its slot comes round, a connection idle past its deadline (no frame and
no pong for ``idle_timeout``) is closed with 4000, any other gets the same pre-built ping
frame. So 10,000 connections cost one task and one timer, not 10,000 of each, and their pings
are spread evenly over the interval instead of all at once. An idle connection is closed at
most one ping interval after its deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio

PING_FRAME = b"\x89\x00"
"""A server's ping with no payload (RFC 6455 §5.5.2: FIN, opcode 0x9, unmasked, length 0)."""


class Watched(Protocol):
    def idle_deadline(self) -> float: ...

    def ping(self) -> None: ...

    def close_idle(self, now: float) -> None: ...


class Wheel:
    def __init__(self, interval: float) -> None:
        self.slots: list[set[Watched]] = [set() for _ in range(max(1, math.ceil(interval)))]
        self.tick = interval / len(self.slots)
        self._next = 0
        self._where: dict[Watched, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def add(self, connection: Watched) -> None:
        # Round robin, so connections opened together spread over the interval.
        slot = self._next
        self._next = (self._next + 1) % len(self.slots)
        self.slots[slot].add(connection)
        self._where[connection] = slot

    def discard(self, connection: Watched) -> None:
        slot = self._where.pop(connection, None)
        if slot is not None:
            self.slots[slot].discard(connection)

    def turn(self, slot: int, now: float) -> None:
        """Visit one slot: close the idle, ping the others."""
        for connection in list(self.slots[slot]):
            if now >= connection.idle_deadline():
                connection.close_idle(now)
            else:
                connection.ping()

    async def run(self, after_turn: Callable[[], None]) -> None:
        """Turn a slot every ``tick`` seconds for ever; ``after_turn`` flushes the pings."""
        slot = 0
        deadline = trio.current_time()
        while True:
            deadline += self.tick
            await trio.sleep_until(deadline)
            self.turn(slot, trio.current_time())
            after_turn()
            slot = (slot + 1) % len(self.slots)

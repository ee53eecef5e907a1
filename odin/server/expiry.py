"""Closing connections whose token expires, from one task for the whole server.

A connection opened with a token that has an ``exp`` is closed with 4010 at ``exp`` +
``auth.leeway`` (a client that wants to stay reconnects with a new token). One heap and one
task for every such connection, like the liveness wheel's one timer, rather than a timer per
connection; the wheel's second-granularity would let a token outlive its expiry by a ping
interval, this does not.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Protocol

import trio


class Expiring(Protocol):
    def close_expired(self) -> None: ...


class Expiries:
    def __init__(self, leeway: float) -> None:
        self.leeway = leeway
        self._heap: list[tuple[float, int, Expiring]] = []
        self._live: dict[Expiring, int] = {}
        self._order = itertools.count()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, connection: Expiring, expires_at: float) -> None:
        """Close ``connection`` at ``expires_at`` (Unix seconds) plus the leeway."""
        deadline = trio.current_time() + (expires_at + self.leeway - time.time())
        number = next(self._order)
        self._live[connection] = number
        heapq.heappush(self._heap, (deadline, number, connection))
        if self._heap[0][1] == number:
            self._changed.set()  # sooner than what the task sleeps towards

    def discard(self, connection: Expiring) -> None:
        # Left in the heap, skipped when it comes up (its number no longer matches).
        self._live.pop(connection, None)

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and (heap[0][0] <= now or self._live.get(heap[0][2]) != heap[0][1]):
                _, number, connection = heapq.heappop(heap)
                if self._live.get(connection) == number:
                    del self._live[connection]
                    connection.close_expired()
            self._changed = trio.Event()
            with trio.move_on_at(heap[0][0] if heap else float("inf")):
                await self._changed.wait()

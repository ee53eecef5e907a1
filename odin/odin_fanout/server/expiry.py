"""Token deadlines of every connection, from one task for the whole server.

A connection opened with a token that has an ``exp`` is told ``token_expiring`` ``auth.
expiry_notice`` seconds before it (v1 clients; a ``refresh`` with a new token moves both
deadlines), and closed with 4010 at ``exp`` + ``auth.leeway``. A connection that must still
send its token in-band (``auth``) is closed with 4011 if it has not within the handshake
timeout. One heap and one task for all of them, like the liveness wheel's one timer, rather
than a timer per connection; the wheel's second-granularity would let a token outlive its
expiry by a ping interval, this does not.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Literal, Protocol

import trio

Deadline = Literal["expiring", "expired", "auth"]


class Expiring(Protocol):
    def on_deadline(self, kind: Deadline) -> None: ...


class Expiries:
    def __init__(self, leeway: float, notice: float) -> None:
        self.leeway = leeway
        self.notice = notice
        self._heap: list[tuple[float, int, Deadline, Expiring]] = []
        self._live: dict[Expiring, int] = {}
        """The connection's current schedule (older entries in the heap are skipped)."""
        self._order = itertools.count()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._live)

    def expire(self, connection: Expiring, expires_at: float) -> None:
        """Warn ``connection`` before ``expires_at`` (Unix seconds) and close it after, plus
        the leeway; replaces what was scheduled for it."""
        remaining = expires_at - time.time()
        now = trio.current_time()
        number = self._schedule(connection)
        if self.notice > 0 and remaining > 0:
            # A token that expires sooner than the notice is announced at once.
            self._push(now + max(0.0, remaining - self.notice), number, "expiring", connection)
        self._push(now + remaining + self.leeway, number, "expired", connection)

    def require_auth(self, connection: Expiring, within: float) -> None:
        """Close ``connection`` unless it authenticates within ``within`` seconds."""
        number = self._schedule(connection)
        self._push(trio.current_time() + within, number, "auth", connection)

    def discard(self, connection: Expiring) -> None:
        # Left in the heap, skipped when they come up (their number no longer matches).
        self._live.pop(connection, None)

    def _schedule(self, connection: Expiring) -> int:
        number = next(self._order)
        self._live[connection] = number
        return number

    def _push(self, deadline: float, number: int, kind: Deadline, connection: Expiring) -> None:
        heapq.heappush(self._heap, (deadline, number, kind, connection))
        if self._heap[0][1] == number:
            self._changed.set()  # sooner than what the task sleeps towards

    async def run(self) -> None:
        heap = self._heap
        live = self._live
        while True:
            now = trio.current_time()
            while heap and (heap[0][0] <= now or live.get(heap[0][3]) != heap[0][1]):
                _, number, kind, connection = heapq.heappop(heap)
                if live.get(connection) == number:
                    if kind != "expiring":
                        del live[connection]
                    connection.on_deadline(kind)
            self._changed = trio.Event()
            with trio.move_on_at(heap[0][0] if heap else float("inf")):
                await self._changed.wait()

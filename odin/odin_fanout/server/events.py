"""Recent connection events for the operator console: a bounded ring read by position.

The console's event log shows connects, closes, slow consumers, recoveries and rate limiting
as they happen. The server appends each here (once per connection event, never per message)
and every watching console reads what is newer than the last position it saw, so one slow
console costs nothing and a console that fell behind is told how many it missed.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from odin_fanout.control.protocol import ServerEvent

Detail = str | int | float | bool | None


class EventRing:
    def __init__(self, capacity: int = 2000) -> None:
        self.capacity = capacity
        self._ring: deque[ServerEvent] = deque(maxlen=capacity)
        self.last = 0
        """Position of the newest event (0: none yet)."""

    def emit(self, kind: str, conn: str = "", **detail: Detail) -> None:
        self.last += 1
        self._ring.append(ServerEvent(self.last, time.time(), kind, conn, detail))

    def since(self, seen: int, limit: int) -> tuple[list[ServerEvent], int]:
        """Events after position ``seen``, at most the newest ``limit``, and how many newer
        than ``seen`` are not in them (fell out of the ring or over the limit)."""
        newer = self.last - seen
        if newer <= 0:
            return [], 0
        kept = min(newer, limit, len(self._ring))
        events = list(self._ring)[-kept:] if kept else []
        return events, newer - kept

    @property
    def first(self) -> int:
        """Position of the oldest event kept (0: none)."""
        return self.last - len(self._ring) + 1 if self._ring else 0

    def before(self, position: int, limit: int) -> list[ServerEvent]:
        """The newest ``limit`` events older than ``position`` (0: than none, the newest),
        oldest first. Positions are consecutive, so the page is found by index."""
        size = len(self._ring)
        end = size if position <= 0 else max(0, min(position - self.first, size))
        return list(itertools.islice(self._ring, max(0, end - limit), end))

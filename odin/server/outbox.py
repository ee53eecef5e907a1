"""One connection's outbound queue: frames waiting for the socket, bounded, with no I/O.

The fan-out encodes each message once and the same bytes object is queued for every
subscriber; the writer (writer.py) later takes the queue's head as a list of buffers for one
``writev``, so a burst costs one system call per connection instead of one per frame. The queue
is bounded in frames and bytes; at the bound ``offer`` refuses and the caller applies the
slow-consumer policy (close, or ``conflate``: keep the newest event per channel behind a gap
notice). Control frames and replies owed by the protocol are forced past the bound; they are
few and bounded by their own limits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice


class Item:
    """A frame (or the unwritten rest of one) waiting in the queue."""

    __slots__ = ("channel", "data", "gap", "queued_at", "seq", "started")

    def __init__(
        self, data: bytes | memoryview, channel: str | None, seq: int, queued_at: float
    ) -> None:
        self.data = data
        self.channel = channel
        """The event's channel; None for control frames and replies, which are never dropped."""
        self.seq = seq
        self.queued_at = queued_at
        self.started = False
        """Part of it is on the wire already, so it must be finished, never dropped."""
        self.gap: tuple[str, int, int] | None = None
        """For a gap notice: (channel, from, to), so later drops can widen it."""


_IDLE: deque[Item] = deque(maxlen=0)
"""The queue of every empty outbox: an idle connection holds no deque of its own (about
600 bytes each). Never appended to (its maxlen would drop the item): ``offer`` replaces it."""

GapEncoder = Callable[[str, int, int], bytes | None]
"""The notice for a conflated range, or None where the client gets none (legacy protocol)."""


class Outbox:
    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = self.max_bytes = 0
        self.set_limits(max_messages, max_bytes)
        self._queue = _IDLE
        self._bytes = 0

    def set_limits(self, max_messages: int, max_bytes: int) -> None:
        """The bounds (at start, and on a configuration reload). Frames already queued stay;
        a queue now over its bound takes nothing new until it drains."""
        self.max_messages = max_messages
        self.max_bytes = max_bytes

    # ---- inspection ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def oldest_queued_at(self) -> float | None:
        return self._queue[0].queued_at if self._queue else None

    @property
    def half_empty(self) -> bool:
        """At most half full in frames and bytes: a paced replay may go on."""
        return len(self._queue) <= self.max_messages // 2 and self._bytes <= self.max_bytes // 2

    # ---- adding ----------------------------------------------------------------------------

    def offer(
        self,
        frame: bytes | memoryview,
        channel: str | None,
        seq: int,
        now: float,
        *,
        force: bool = False,
    ) -> bool:
        """Queue ``frame``; False (and nothing queued) when the queue is at its bound.

        An empty queue takes any frame, so one frame larger than the byte bound is delivered
        rather than refused forever: the bound is the limit plus one frame.
        """
        queue = self._queue
        if (
            not force
            and queue
            and (len(queue) >= self.max_messages or self._bytes + len(frame) > self.max_bytes)
        ):
            return False
        if queue is _IDLE:
            queue = self._queue = deque()
        queue.append(Item(frame, channel, seq, now))
        self._bytes += len(frame)
        return True

    # ---- taking ----------------------------------------------------------------------------

    def head(self, count: int) -> list[bytes | memoryview]:
        """The first ``count`` queued buffers, oldest first, for one vectored write."""
        return [item.data for item in islice(self._queue, count)]

    def mark_started(self, count: int) -> None:
        """The first ``count`` frames are being written: never drop or rewrite them."""
        for item in islice(self._queue, count):
            item.started = True

    def consume(self, written: int) -> None:
        """``written`` bytes from the head went out: drop whole frames, trim a partial one."""
        self._bytes -= written
        queue = self._queue
        while written and queue:
            item = queue[0]
            size = len(item.data)
            if written >= size:
                written -= size
                queue.popleft()
                if not queue:
                    self._queue = _IDLE
            else:
                item.data = memoryview(item.data)[written:]
                item.started = True
                written = 0

    def clear(self) -> None:
        self._queue = _IDLE
        self._bytes = 0

    # ---- the slow-consumer policies --------------------------------------------------------

    def conflate(self, encode_gap: GapEncoder) -> tuple[int, list[tuple[str, int, int]]]:
        """Keep only the newest queued event of each channel, with a gap notice before it
        (when ``encode_gap`` gives one).

        Returns the number of events dropped and the (channel, from, to) notices it added (a
        notice widened in place is still one notice).
        """
        newest: dict[str, Item] = {}
        for item in self._queue:
            if item.channel is not None:
                newest[item.channel] = item
        kept: deque[Item] = deque()
        dropped: dict[str, tuple[int, int]] = {}
        open_gaps: dict[str, Item] = {}
        dropped_count = 0
        announced: list[tuple[str, int, int]] = []
        for item in self._queue:
            channel = item.channel
            if item.gap is not None and not item.started:
                open_gaps[item.gap[0]] = item
            if channel is None or item.started or newest[channel] is item:
                if channel is not None and channel in dropped:
                    first, last = dropped.pop(channel)
                    gap_item = open_gaps.get(channel)
                    if gap_item is not None and gap_item.gap is not None:
                        # Widen the notice already queued instead of adding a second one.
                        first = min(first, gap_item.gap[1])
                        notice = encode_gap(channel, first, last)
                        assert notice is not None  # the same encoder made the first one
                        gap_item.gap = (channel, first, last)
                        gap_item.data = notice
                    elif (notice := encode_gap(channel, first, last)) is not None:
                        gap_item = Item(notice, None, 0, item.queued_at)
                        gap_item.gap = (channel, first, last)
                        kept.append(gap_item)
                        open_gaps[channel] = gap_item
                        announced.append(gap_item.gap)
                if channel is not None:
                    open_gaps.pop(channel, None)
                kept.append(item)
                continue
            dropped_count += 1
            first, _ = dropped.get(channel, (item.seq, 0))
            dropped[channel] = (first, item.seq)
        self._queue = kept if kept else _IDLE
        self._bytes = sum(len(item.data) for item in kept)
        return dropped_count, announced

    def discard_events(self) -> int:
        """Drop every queued event not yet started (before a close); return how many."""
        kept = deque(item for item in self._queue if item.channel is None or item.started)
        dropped = len(self._queue) - len(kept)
        self._queue = kept if kept else _IDLE
        self._bytes = sum(len(item.data) for item in kept)
        return dropped

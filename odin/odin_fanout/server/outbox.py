"""One connection's outbound queue: frames waiting for the socket, bounded, with no I/O.

The fan-out encodes each message once and the same bytes object is queued for every
subscriber; the writer (writer.py) later takes the queue's head as a list of buffers for one
``writev``, so a burst costs one system call per connection instead of one per frame. The queue
is bounded in frames and bytes; at the bound ``offer`` refuses and the caller applies the
slow-consumer policy (close, or ``conflate``: keep the newest event per channel behind a gap
notice).

Frames the server owes whatever the client's pace (a subscribe's hand-over, replies, pings)
are forced past the bound and do not count against it afterwards: live messages get the full
bound on top of them, so a client reading as fast as it can is never taken for a slow one
because a recovery was queued just before. They are bounded by their own limits (a hand-over
by ``history.recovery_max_messages`` plus the seam's hold, itself the queue's bound; a replay
paces itself on ``half_empty``, which counts every frame; replies by the rate limit), so the
queue stays bounded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice

Gap = tuple[str, int, int, str]
"""What a queued gap notice is for: (channel, from, to, reason)."""


class Item:
    """A frame (or the unwritten rest of one) waiting in the queue."""

    __slots__ = ("channel", "data", "forced", "gap", "queued_at", "seq", "started")

    def __init__(
        self,
        data: bytes | memoryview,
        channel: str | None,
        seq: int,
        queued_at: float,
        forced: bool = False,
        gap: Gap | None = None,
    ) -> None:
        self.data = data
        self.channel = channel
        """The event's channel; None for control frames, replies and gap notices."""
        self.seq = seq
        self.queued_at = queued_at
        self.started = False
        """Part of it is on the wire already, so it must be finished, never dropped."""
        self.forced = forced
        """Queued past the bound: not counted against it, never dropped by conflation."""
        self.gap = gap
        """For a gap notice, what it announces, so conflation can merge it with its channel's
        dropped events."""


_IDLE: deque[Item] = deque(maxlen=0)
"""The queue of every empty outbox: an idle connection holds no deque of its own (about
600 bytes each). Never appended to (its maxlen would drop the item): ``offer`` replaces it."""

GapEncoder = Callable[[str, int, int], bytes | None]
"""The notice for a conflated range, or None where the client gets none (legacy protocol)."""


class Outbox:
    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = self.max_bytes = 0
        self._limit = self._byte_limit = 0
        """The bounds plus the frames (bytes) queued with ``force``, which do not count
        against them: kept up to date so that ``offer`` compares as cheaply as without."""
        self.set_limits(max_messages, max_bytes)
        self._queue = _IDLE
        self._bytes = 0

    def set_limits(self, max_messages: int, max_bytes: int) -> None:
        """The bounds (at start, and on a configuration reload). Frames already queued stay;
        a queue now over its bound takes nothing new until it drains."""
        self._limit += max_messages - self.max_messages
        self._byte_limit += max_bytes - self.max_bytes
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
        """At most half full in frames and bytes, forced ones included: a paced replay may go
        on (its own frames are forced, so counting only the bounded ones would never stop
        it)."""
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
        gap: Gap | None = None,
    ) -> bool:
        """Queue ``frame``; False (and nothing queued) when the queue is at its bound.

        Only frames not forced count against the bound. When none is queued any frame is
        taken, so one frame larger than the byte bound is delivered rather than refused
        forever: the bound is the limit plus one frame. ``gap``: the frame is that notice.
        """
        queue = self._queue
        size = len(frame)
        if force:
            self._limit += 1
            self._byte_limit += size
        elif (
            queue
            and (len(queue) >= self._limit or self._bytes + size > self._byte_limit)
            and len(queue) > self._limit - self.max_messages  # not only forced frames
        ):
            return False
        if queue is _IDLE:
            queue = self._queue = deque()
        queue.append(Item(frame, channel, seq, now, force, gap))
        self._bytes += size
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
                if item.forced:
                    self._limit -= 1
                    self._byte_limit -= size
                if not queue:
                    self._queue = _IDLE
            else:
                item.data = memoryview(item.data)[written:]
                item.started = True
                if item.forced:
                    self._byte_limit -= written
                written = 0

    def clear(self) -> None:
        self._queue = _IDLE
        self._bytes = 0
        self._limit, self._byte_limit = self.max_messages, self.max_bytes

    def _keep(self, kept: deque[Item]) -> None:
        """Replace the queue by ``kept`` (what a policy left), with its counts."""
        self._queue = kept if kept else _IDLE
        self._bytes = sum(len(item.data) for item in kept)
        forced = [len(item.data) for item in kept if item.forced]
        self._limit = self.max_messages + len(forced)
        self._byte_limit = self.max_bytes + sum(forced)

    # ---- the slow-consumer policies --------------------------------------------------------

    def conflate(self, encode_gap: GapEncoder) -> tuple[int, list[tuple[str, int, int]]]:
        """Keep only the newest queued event of each channel's run, with one gap notice
        before it (when ``encode_gap`` gives one) standing for everything of the channel it
        replaces: the run's dropped events and the notices queued among them.

        A run is what conflation may rewrite of a channel, between frames it must leave where
        they are: a frame started or forced (a hand-over, a reply) ends its channel's run, and
        a control frame that is not a tagged notice (an ack may give a position) ends every
        run; so does a position going down in queue order (the history was recreated: a new
        epoch), so no notice spans two epochs. The client then reads, per channel, notices
        and events in position order, and each notice starts right after what it has.

        Returns the number of events dropped and the (channel, from, to) notices it added (a
        notice that takes the place of an earlier conflated one is not new).
        """
        runs: dict[str, list[Item]] = {}
        tops: dict[str, int] = {}
        doomed: set[int] = set()
        before: dict[int, Item] = {}
        announced: list[tuple[str, int, int]] = []
        dropped = 0

        def close(channel: str, run: list[Item]) -> None:
            nonlocal dropped
            newest = len(run) - 1
            while newest >= 0 and run[newest].channel is None:
                newest -= 1
            replaced = run[:newest] if newest > 0 else []
            events = sum(1 for item in replaced if item.channel is not None)
            if not events:
                return  # nothing to drop; notices alone stay as they came
            dropped += events
            first = last = 0
            was_conflated = False
            for n, item in enumerate(replaced):
                doomed.add(id(item))
                if item.gap is not None:
                    low, high = item.gap[1], item.gap[2]
                    was_conflated = was_conflated or item.gap[3] == "conflated"
                else:
                    low = high = item.seq
                first = low if n == 0 else min(first, low)
                last = high if n == 0 else max(last, high)
            notice = encode_gap(channel, first, last)
            if notice is not None:
                keep = run[newest]
                gap = (channel, first, last, "conflated")
                before[id(keep)] = Item(notice, None, 0, keep.queued_at, gap=gap)
                if not was_conflated:
                    announced.append(gap[:3])

        for item in self._queue:
            channel = item.channel if item.gap is None else item.gap[0]
            if channel is None:  # a control frame: every channel's run ends here
                for name, ended in runs.items():
                    close(name, ended)
                runs.clear()
                continue
            run = runs.get(channel)
            if item.started or item.forced:
                if run is not None:
                    close(channel, runs.pop(channel))
                continue
            low, high = (item.seq, item.seq) if item.gap is None else item.gap[1:3]
            if run is not None and low <= tops[channel]:  # a new epoch
                close(channel, run)
                run = None
            if run is None:
                run = runs[channel] = []
            run.append(item)
            tops[channel] = high
        for name, ended in runs.items():
            close(name, ended)
        if not doomed:
            return 0, []
        kept: deque[Item] = deque()
        for item in self._queue:
            if id(item) in doomed:
                continue
            notice = before.get(id(item))
            if notice is not None:
                kept.append(notice)
            kept.append(item)
        self._keep(kept)
        return dropped, announced

    def discard_events(self) -> int:
        """Before a close: drop every frame not started from the first event not started on
        (notices and acks after a dropped event would name positions past it; the client
        recovers from the last event it got). Return how many events it dropped (control
        frames, notices and replies dropped with them are not deliveries: not counted)."""
        kept: deque[Item] = deque()
        dropped = 0
        cutting = False
        for item in self._queue:
            if not item.started and (cutting or item.channel is not None):
                cutting = True
                dropped += item.channel is not None
                continue
            kept.append(item)
        if cutting:
            self._keep(kept)
        return dropped

"""One connection's outbound byte stream: a fast path for pre-encoded frames, a bounded queue
for what the socket cannot take yet, and the only place that writes to the socket.

trio-websocket keeps the handshake, the reading side, pings and close frames, but it writes
through this object (it is the ``trio.abc.Stream`` trio-websocket wraps), so its control frames
and Odin's event frames share one ordered queue and never interleave.

Why not ``send_message``: it encodes per connection, takes a lock and checkpoints several
times per delivery (about 40k deliveries/s per core here). The fan-out instead encodes each
message once and calls ``offer``, which writes straight to the non-blocking socket when the
queue is empty (about 175k deliveries/s, see docs/performance.md) and otherwise appends to
the queue that the writer task drains. The queue is bounded in messages and bytes; at the
bound ``offer`` returns ``FULL`` and the caller applies the slow-consumer policy.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from itertools import islice

import trio

# Up to this many queued frames go to the kernel in one writev call.
_WRITEV_BATCH = 64
# Largest batch of queued bytes joined for one send_all on streams without a file descriptor.
_JOIN_BATCH = 64 * 1024


class Offer(enum.Enum):
    SENT = "sent"
    """Written to the socket in full."""
    QUEUED = "queued"
    """Waiting in the connection's queue (all of it, or the part the socket did not take)."""
    FULL = "full"
    """Refused: the queue is at its limit. Nothing was written or queued."""
    CLOSED = "closed"
    """The connection is closed or broken."""


class _Item:
    """A frame (or the rest of one) waiting to be written."""

    __slots__ = ("channel", "data", "done", "gap", "queued_at", "seq", "started")

    def __init__(
        self,
        data: bytes | memoryview,
        channel: str | None,
        seq: int,
        queued_at: float,
        done: trio.Event | None = None,
    ) -> None:
        self.data = data
        self.channel = channel
        """The event's channel; None for control frames, which are never dropped."""
        self.seq = seq
        self.queued_at = queued_at
        self.done = done
        """Set once the frame is fully written (or the connection failed)."""
        self.started = False
        """Part of it is on the wire already, so it must be finished, never dropped."""
        self.gap: tuple[str, int, int] | None = None
        """For a gap notice: (channel, from, to), so later drops can widen it."""


GapEncoder = Callable[[str, int, int], bytes | None]
"""The notice for a conflated range, or None where the client gets none (legacy protocol)."""


class ConnectionWriter(trio.abc.Stream):
    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        max_messages: int,
        max_bytes: int,
    ) -> None:
        self._transport = transport
        self._fd = transport.socket.fileno() if isinstance(transport, trio.SocketStream) else -1
        self.max_messages = self.max_bytes = self._hard_limit = 0
        self.set_limits(max_messages, max_bytes)
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._wakeup = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._prefix = b""
        self._closed = False
        self._error: BaseException | None = None
        self.bytes_written = 0

    def set_limits(self, max_messages: int, max_bytes: int) -> None:
        """The queue's bounds (at start, and on a configuration reload). Frames already queued
        stay; a queue now over its bound takes nothing new until it drains."""
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        # Control frames are not refused, but a peer that sends pings and never reads must
        # not grow the queue without bound: past this the connection is declared broken.
        self._hard_limit = 2 * max_bytes + 64 * 1024

    # ---- inspection ----------------------------------------------------------------------

    @property
    def queued_messages(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def oldest_queued_at(self) -> float | None:
        return self._queue[0].queued_at if self._queue else None

    @property
    def is_closed(self) -> bool:
        return self._closed or self._error is not None

    # ---- the fan-out's side --------------------------------------------------------------

    def offer(
        self, frame: bytes, channel: str | None = None, seq: int = 0, *, force: bool = False
    ) -> Offer:
        """Write ``frame`` now if the socket takes it, else queue it, else refuse (FULL).

        ``force`` queues past the limits: for replies the protocol owes and for recovered
        messages, which are bounded by their own limits.
        """
        if self._closed or self._error is not None:
            return Offer.CLOSED
        if not self._queue and self._fd >= 0:
            try:
                written = os.write(self._fd, frame)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._fail(exc)
                return Offer.CLOSED
            self.bytes_written += written
            if written == len(frame):
                return Offer.SENT
            item = _Item(memoryview(frame)[written:], channel, seq, trio.current_time())
            item.started = written > 0
            self._append(item)
            return Offer.QUEUED
        # An empty queue takes any frame, so a single frame larger than the byte limit is
        # delivered (slowly) rather than refused forever; the bound is the limit plus one frame.
        if (
            not force
            and self._queue
            and (
                len(self._queue) >= self.max_messages
                or self._queued_bytes + len(frame) > self.max_bytes
            )
        ):
            return Offer.FULL
        self._append(_Item(frame, channel, seq, trio.current_time()))
        return Offer.QUEUED

    def _append(self, item: _Item) -> None:
        self._queue.append(item)
        self._queued_bytes += len(item.data)
        self._wakeup.unpark_all()

    def conflate(self, encode_gap: GapEncoder) -> tuple[int, list[tuple[str, int, int]]]:
        """Keep only the newest queued event of each channel, with a gap notice before it
        (when ``encode_gap`` gives one).

        Returns the number of events dropped and the (channel, from, to) gaps announced.
        """
        newest: dict[str, _Item] = {}
        for item in self._queue:
            if item.channel is not None:
                newest[item.channel] = item
        kept: deque[_Item] = deque()
        dropped: dict[str, tuple[int, int]] = {}
        open_gaps: dict[str, _Item] = {}
        dropped_count = 0
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
                        gap_item = _Item(notice, None, 0, item.queued_at)
                        gap_item.gap = (channel, first, last)
                        kept.append(gap_item)
                        open_gaps[channel] = gap_item
                if channel is not None:
                    open_gaps.pop(channel, None)
                kept.append(item)
                continue
            dropped_count += 1
            first, _ = dropped.get(channel, (item.seq, 0))
            dropped[channel] = (first, item.seq)
        self._queue = kept
        self._queued_bytes = sum(len(item.data) for item in kept)
        gaps = [item.gap for item in kept if item.gap is not None]
        return dropped_count, gaps

    def discard_events(self) -> int:
        """Drop every queued event not yet started (before a close); return how many."""
        kept = deque(item for item in self._queue if item.channel is None or item.started)
        dropped = len(self._queue) - len(kept)
        self._queue = kept
        self._queued_bytes = sum(len(item.data) for item in kept)
        return dropped

    async def wait_for_room(self) -> None:
        """Wait until the queue is at most half full (for paced replays)."""
        while not self.is_closed and (
            len(self._queue) > self.max_messages // 2 or self._queued_bytes > self.max_bytes // 2
        ):
            await self._room.park()
        await trio.lowlevel.checkpoint()

    # ---- the writer task -----------------------------------------------------------------

    async def run(self) -> None:
        """Drain the queue into the socket until the connection closes or breaks."""
        try:
            while not self._closed and self._error is None:
                if not self._queue:
                    await self._wakeup.park()
                    continue
                if self._fd >= 0:
                    await trio.lowlevel.wait_writable(self._fd)
                    self._flush_nowait()
                else:
                    await self._send_batch()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(exc)

    def _flush_nowait(self) -> None:
        while self._queue and not self._closed:
            views = [item.data for item in islice(self._queue, _WRITEV_BATCH)]
            try:
                written = os.writev(self._fd, views)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._consume(written)

    async def _send_batch(self) -> None:
        parts: list[bytes | memoryview] = []
        size = 0
        for item in self._queue:
            parts.append(item.data)
            size += len(item.data)
            if size >= _JOIN_BATCH:
                break
        await self._transport.send_all(b"".join(parts))
        self._consume(size)

    def _consume(self, written: int) -> None:
        self.bytes_written += written
        self._queued_bytes -= written
        queue = self._queue
        while written and queue:
            item = queue[0]
            size = len(item.data)
            if written >= size:
                written -= size
                queue.popleft()
                if item.done is not None:
                    item.done.set()
            else:
                item.data = memoryview(item.data)[written:]
                item.started = True
                written = 0
        if len(queue) <= self.max_messages // 2 and self._queued_bytes <= self.max_bytes // 2:
            self._room.unpark_all()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        for item in self._queue:
            if item.done is not None:
                item.done.set()
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.unpark_all()
        self._room.unpark_all()

    def mark_closed(self) -> None:
        """Refuse every further write: the socket is about to be closed."""
        self._closed = True
        self._fail(trio.ClosedResourceError("connection closed"))

    # ---- trio.abc.Stream, used by trio-websocket -----------------------------------------

    def replay_on_receive(self, data: bytes) -> None:
        """Hand ``data`` (already read by Odin's HTTP routing) to the next receive_some."""
        self._prefix = data + self._prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._transport.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("connection closed")
        if self._error is not None or self._queued_bytes + len(data) > self._hard_limit:
            if self._error is None:
                self._fail(trio.BrokenResourceError("outbound queue over its hard limit"))
            raise trio.BrokenResourceError("connection broken") from self._error
        result = self.offer(bytes(data), force=True)
        if result is Offer.SENT:
            await trio.lowlevel.checkpoint()
            return
        if result is Offer.CLOSED:
            raise trio.BrokenResourceError("connection broken") from self._error
        # offer() appended this frame (or its unwritten rest) last.
        done = self._queue[-1].done = trio.Event()
        await done.wait()
        if self._error is not None:
            raise trio.BrokenResourceError("connection broken") from self._error

    async def wait_send_all_might_not_block(self) -> None:
        await self.wait_for_room()

    async def aclose(self) -> None:
        self.mark_closed()
        await self._transport.aclose()

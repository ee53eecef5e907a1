"""The only code that writes to a client's socket: coalesced, non-blocking, task-free when it can.

Frames are queued in the connection's ``Outbox`` and the writer is marked dirty in the
server's ``Flusher``; the fan-out flushes every dirty writer once per batch it takes from the
broker, so all frames a connection got in that batch leave in one ``writev`` (a burst costs a
system call per connection, not per delivery; at low rates a batch is one message and nothing
waits). A flush never blocks: what the socket does not take stays queued and a task is started
in the connection's nursery to wait until the socket is writable again; it ends when the queue
is empty, so an idle connection has no writer task at all.

Streams without a file descriptor (in-memory streams in tests) always go through that task,
with ``send_all``.
"""

from __future__ import annotations

import enum
import os

import trio

from odin_fanout.server.outbox import Gap, Outbox

# Up to this many queued frames go to the kernel in one writev call (IOV_MAX is 1024).
_WRITEV_BATCH = 512
# Largest batch of queued bytes joined for one send_all on streams without a file descriptor.
_JOIN_BATCH = 64 * 1024
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Offer(enum.Enum):
    QUEUED = "queued"
    """In the queue; it leaves at the next flush."""
    FULL = "full"
    """Refused: the queue is at its limit. Nothing was queued."""
    CLOSED = "closed"
    """The connection is closed or broken."""


class Flusher:
    """The writers with frames queued since their last flush, server-wide.

    The fan-out and each connection's reader call ``flush`` when they are done with a batch;
    ``run`` is the backstop for frames queued elsewhere (pings, a kick, a drain), flushed on
    the next pass of the scheduler.
    """

    def __init__(self) -> None:
        self._dirty: list[Writer] = []
        self._waiting = trio.lowlevel.ParkingLot()

    def mark(self, writer: Writer) -> None:
        if not self._dirty:
            self._waiting.unpark_all()
        self._dirty.append(writer)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.flush()

    async def run(self) -> None:
        while True:
            if not self._dirty:
                await self._waiting.park()
            self.flush()
            await trio.lowlevel.checkpoint()


class Writer:
    def __init__(self, transport: trio.abc.Stream, outbox: Outbox, flusher: Flusher) -> None:
        self._transport = transport
        self._fd = transport.socket.fileno() if isinstance(transport, trio.SocketStream) else -1
        self.outbox = outbox
        self._flusher = flusher
        self._nursery: trio.Nursery | None = None
        self._dirty = False
        self._waiting = False
        """A task is waiting for the socket to take more; it flushes, not us."""
        self._closed = False
        self.error: BaseException | None = None
        self._room = trio.lowlevel.ParkingLot()
        self.bytes_written = 0

    def attach(self, nursery: trio.Nursery) -> None:
        """The connection's nursery, where a task waits while the socket pushes back."""
        self._nursery = nursery

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def queued_messages(self) -> int:
        return len(self.outbox)

    @property
    def queued_bytes(self) -> int:
        return self.outbox.queued_bytes

    def oldest_queued_at(self) -> float | None:
        return self.outbox.oldest_queued_at()

    def set_limits(self, max_messages: int, max_bytes: int) -> None:
        self.outbox.set_limits(max_messages, max_bytes)

    # ---- queueing ------------------------------------------------------------------------

    def offer(
        self,
        frame: bytes,
        channel: str | None = None,
        seq: int = 0,
        *,
        force: bool = False,
        now: float | None = None,
        gap: Gap | None = None,
    ) -> Offer:
        """Queue ``frame`` for the next flush, or refuse it (FULL) at the queue's bound.

        ``force`` queues past the bound, and the frame does not count against it afterwards:
        for replies the protocol owes and for recovered messages, which are bounded by their
        own limits (outbox.py). ``gap``: the frame is that gap notice.
        """
        if self._closed:
            return Offer.CLOSED
        if not self.outbox.offer(
            frame, channel, seq, trio.current_time() if now is None else now, force=force, gap=gap
        ):
            return Offer.FULL
        if not self._dirty:
            self._dirty = True
            self._flusher.mark(self)
        return Offer.QUEUED

    def write_now(self, frame: bytes, channel: str | None, seq: int, now: float) -> Offer:
        """``offer`` for a frame with nothing to be joined with: when the queue is empty it
        goes to the socket at once (one ``write``, no queueing), and only what the socket does
        not take is queued. The fan-out uses it for a batch of one message."""
        if self._closed:
            return Offer.CLOSED
        if self._fd < 0 or self._waiting or self.outbox:
            return self.offer(frame, channel, seq, now=now)
        try:
            written = os.write(self._fd, frame)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._fail(exc)
            return Offer.CLOSED
        self.bytes_written += written
        if written < len(frame):
            rest = memoryview(frame)[written:] if written else frame
            # The queue is empty, so it takes the rest, which counts against the bound as
            # any live message does.
            self.outbox.offer(rest, channel, seq, now)
            if written:
                self.outbox.mark_started(1)
            self._start_waiting()
        return Offer.QUEUED

    # ---- writing -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the socket takes now, without blocking; leave the rest to a task."""
        self._dirty = False
        if self._closed or self._waiting or not self.outbox:
            return
        if self._fd < 0:
            self._start_waiting()
            return
        if self._write_some():
            self._start_waiting()

    def _write_some(self) -> bool:
        """Write until the queue is empty or the socket is full; True if it is full."""
        outbox = self.outbox
        while outbox:
            try:
                written = os.writev(self._fd, outbox.head(_WRITEV_BATCH))
            except BlockingIOError:
                if outbox.half_empty:
                    self._room.unpark_all()
                return True
            except OSError as exc:
                self._fail(exc)
                return False
            self.bytes_written += written
            outbox.consume(written)
        if outbox.half_empty:
            self._room.unpark_all()
        return False

    def _start_waiting(self) -> None:
        if self._nursery is None:  # not attached yet: the connection flushes once it is
            return
        self._waiting = True
        self._nursery.start_soon(self._wait_and_write)

    async def _wait_and_write(self) -> None:
        try:
            while self.outbox and not self._closed:
                if self._fd >= 0:
                    await trio.lowlevel.wait_writable(self._fd)
                    self._write_some()
                else:
                    await self._send_batch()
        except _BROKEN as exc:
            self._fail(exc)
        finally:
            self._waiting = False

    async def _send_batch(self) -> None:
        parts: list[bytes | memoryview] = []
        size = 0
        for part in self.outbox.head(_WRITEV_BATCH):
            parts.append(part)
            size += len(part)
            if size >= _JOIN_BATCH:
                break
        # In flight from here: conflation or a discard while send_all waits must keep them.
        self.outbox.mark_started(len(parts))
        await self._transport.send_all(b"".join(parts))
        if self._closed:
            return
        self.bytes_written += size
        self.outbox.consume(size)
        if self.outbox.half_empty:
            self._room.unpark_all()

    # ---- waiting -------------------------------------------------------------------------

    async def wait_for_room(self) -> None:
        """Wait until the queue is at most half full (for paced replays)."""
        self.flush()
        while not self._closed and not self.outbox.half_empty:
            await self._room.park()
        await trio.lowlevel.checkpoint()  # a replay that never waits still lets others run

    async def wait_flushed(self) -> None:
        """Wait until everything queued is written (or the connection broke)."""
        self.flush()
        while not self._closed and self.outbox:
            await self._room.park()

    # ---- the end -------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.mark_closed()

    def mark_closed(self) -> None:
        """Refuse every further frame: the socket is broken or about to be closed."""
        self._closed = True
        self.outbox.clear()
        self._room.unpark_all()

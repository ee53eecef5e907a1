"""Live taps: the frames one connection, or one channel, receives, for an operator to follow.

A tap is asked for on the control socket (``tap``); the console's task turns what it holds
into ``{"stream": "tap", ...}`` lines. While nobody taps, a connection pays one attribute check
per frame (``Connection.tapped``): only tapped connections call ``Taps.frame``, which keeps a
reference to the frame (the bytes already queued, no copy) with its time and position; the
text is cut and described later, in the console's task, off the fan-out's path.

Bounds: a tap takes at most ``rate`` frames a second (a token bucket, burst one second's
worth) and holds at most ``TAP_BUFFER`` of them; beyond either, frames are not kept but
counted, and the next line says how many were skipped (newest dropped, never queued). Taps
are one per attached console, and consoles are bounded by ``control.max_clients``.

While a channel tap exists every connection is flagged (the check is per frame, the match
only for tapped connections); the flags are set and cleared in one pass over the open
connections when the first channel tap starts and the last one stops.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import trio

from odin_fanout.control.protocol import TAP_BUFFER, TAP_TEXT_BYTES, TapClosed, TapLine
from odin_fanout.protocol.channels import match_keys
from odin_fanout.protocol.ratelimit import TokenBucket

if TYPE_CHECKING:
    from odin_fanout.server.connection import Connection

_OPCODES: Final = {0x2: "binary", 0x8: "close", 0x9: "ping", 0xA: "pong"}


class TapFeed:
    """One tap: what it follows, and the frames it took, waiting for its console's task."""

    def __init__(self, number: int, conn: str, pattern: str, rate: int, now: float) -> None:
        self.number = number
        self.conn = conn
        self.pattern = pattern
        self.rate = rate
        self._bucket = TokenBucket.full(rate, rate, now)
        self._frames: deque[tuple[float, str, bytes, str, int, int]] = deque()
        self.skipped = 0
        """Frames not kept since the last one kept (beyond the rate, or the buffer full)."""
        self.closed: TapClosed | None = None
        self._waiting = trio.lowlevel.ParkingLot()

    def offer(self, conn: str, frame: bytes, channel: str, seq: int, now: float) -> None:
        if len(self._frames) >= TAP_BUFFER or not self._bucket.try_take(now):
            self.skipped += 1
            return
        self._frames.append((time.time(), conn, frame, channel, seq, self.skipped))
        self.skipped = 0
        self._waiting.unpark_all()

    def close(self, closed: TapClosed) -> None:
        self.closed = closed
        self._waiting.unpark_all()

    async def wait(self) -> None:
        """Until a frame is held or the tap is closed."""
        while not self._frames and self.closed is None:
            await self._waiting.park()

    def take(self) -> TapLine | None:
        """The oldest frame held as a line, or None."""
        if not self._frames:
            return None
        at, conn, frame, channel, seq, skipped = self._frames.popleft()
        text, size, truncated, binary = describe(frame)
        return TapLine(self.number, at, conn, text, size, truncated, binary, channel, seq, skipped)

    def end_line(self) -> TapLine:
        """The last line: how the tapped connection closed, and what was skipped since."""
        return TapLine(self.number, time.time(), self.conn, skipped=self.skipped,
                       closed=self.closed)  # fmt: skip


class Taps:
    """The server's taps, by connection id and by channel; empty nearly always."""

    def __init__(self) -> None:
        self._by_conn: dict[str, list[TapFeed]] = {}
        self.channels: list[TapFeed] = []
        """Channel taps: while there is one, every connection is flagged ``tapped``."""
        self._numbers = 0

    def open(
        self, conn: str, pattern: str, rate: int, connections: Mapping[str, Connection]
    ) -> TapFeed:
        """Start a tap and flag what it follows. ``connections``: the open ones by id (the
        caller has checked that ``conn`` is one of them)."""
        self._numbers += 1
        feed = TapFeed(self._numbers, conn, pattern, rate, trio.current_time())
        if conn:
            self._by_conn.setdefault(conn, []).append(feed)
            connections[conn].tapped = True
            return feed
        self.channels.append(feed)
        if len(self.channels) == 1:
            for connection in connections.values():
                connection.tapped = True
        return feed

    def close(self, feed: TapFeed, connections: Mapping[str, Connection]) -> None:
        """Stop a tap, and unflag the connections no tap follows any more."""
        if feed.conn:
            feeds = self._by_conn.get(feed.conn, [])
            if feed in feeds:
                feeds.remove(feed)
            if not feeds:
                self._by_conn.pop(feed.conn, None)
            connection = connections.get(feed.conn)
            if connection is not None:
                connection.tapped = bool(self.channels) or feed.conn in self._by_conn
        elif feed in self.channels:
            self.channels.remove(feed)
            if not self.channels:
                for connection in connections.values():
                    connection.tapped = connection.id in self._by_conn

    def frame(
        self, connection: Connection, frame: bytes, channel: str | None, seq: int = 0
    ) -> None:
        """A frame was queued to a tapped connection (only those call this)."""
        now = trio.current_time()
        conn = connection.id
        for feed in self._by_conn.get(conn, ()):
            feed.offer(conn, frame, channel or "", seq, now)
        if self.channels and channel:
            keys = match_keys(channel)
            for feed in self.channels:
                if feed.pattern in keys:
                    feed.offer(conn, frame, channel, seq, now)

    def closed(self, connection: Connection, code: int, reason: str, why: str) -> None:
        """A tapped connection is gone: its taps end with how it closed."""
        for feed in self._by_conn.pop(connection.id, ()):
            feed.close(TapClosed(code, reason, why))


def describe(frame: bytes | memoryview) -> tuple[str, int, bool, bool]:
    """(text, payload size, truncated, binary) of a queued frame: a server's WebSocket frame
    (unmasked, FIN set) is read through its header; anything else (an event stream's block)
    is text already. Text is cut to TAP_TEXT_BYTES."""
    view = memoryview(frame)
    payload = view
    if len(view) >= 2 and view[0] & 0x80:
        opcode = view[0] & 0x0F
        length = view[1] & 0x7F
        start = 2
        if length == 126:
            length, start = int.from_bytes(view[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(view[2:10], "big"), 10
        payload = view[start : start + length]
        if opcode != 0x1:
            kind = _OPCODES.get(opcode, f"opcode {opcode}")
            return f"{kind} frame, {length} bytes", length, False, True
    size = len(payload)
    # A cut through a multi-byte character drops its start ("ignore"); the rest is ours, valid.
    text = bytes(payload[:TAP_TEXT_BYTES]).decode("utf-8", "ignore")
    return text, size, size > TAP_TEXT_BYTES, False

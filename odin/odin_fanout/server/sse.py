"""A Server-Sent Events stream: ``GET /sse?channels=BTC.trade,ETH.*``.

An SSE stream is a connection whose client only listens: it subscribes once, from the URL,
and receives the same JSON documents a WebSocket client does, as ``text/event-stream``
blocks (odin/odin_fanout/protocol/sse.py). It is a ``Connection`` in every other way (the connection
limit, tokens and namespaces, the slow-consumer policy, the console, the metrics, the
drain), so only what differs is here: how frames are written, how the stream starts, and how
it ends.

**Exact resume.** Each event's ``id:`` is the stream's cursor ``<epoch>:<position>``: every
message of its channels up to that position has been sent or announced. A browser's
``EventSource`` sends the last one back as ``Last-Event-ID`` when it reconnects (to any
instance), and the stream starts with what came after it: each concrete channel, and each
channel a pattern covers (listed by the broker: this process may never have seen them), is
recovered from the cursor as a WebSocket ``subscribe`` with ``recover`` would be, with the
same outcomes (``subscription_ack`` reports them; a channel that cannot be recovered gets
its latest value).

Recovered messages come channel by channel and a broker read can be ahead of this process's
feed, so while a stream starts, everything the fan-out hands it is held; at the hand-over
the held and the recovered messages are merged in position order, and none of them claims a
position past the floor (what the feed has handed on by then, or the cursor if later): a
message of another channel still on its way through the feed may lie below a recovered one.
A stream dropped within its hand-over may so be sent a few messages twice, never miss one.
Afterwards the feed is in position order, so each live event's own position is a safe
cursor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs
import orjson
import trio

from odin_fanout.protocol.access import Grant
from odin_fanout.protocol.channels import is_pattern
from odin_fanout.protocol.close_codes import SLOW_CONSUMER_REASON, CloseCode
from odin_fanout.protocol.codec import encode
from odin_fanout.protocol.errors import ErrorCode
from odin_fanout.protocol.messages import Error, Reconnect, ServerMessage
from odin_fanout.protocol.publication import Position
from odin_fanout.protocol.session import Reply, SubscribeAction
from odin_fanout.protocol.sse import (
    COMMENT,
    Cursor,
    block,
    cursor_only,
    frame_payload,
    gap_block,
    message_block,
    retry_block,
)
from odin_fanout.server import subscriptions
from odin_fanout.server.connection import CloseRequest, Connection, wall_ms
from odin_fanout.server.fanout import Event
from odin_fanout.server.history_reads import HistoryUnavailable
from odin_fanout.server.http import response
from odin_fanout.server.writer import Offer, Writer

if TYPE_CHECKING:
    from odin_fanout.core.admission import Ticket
    from odin_fanout.server.context import ServerContext
    from odin_fanout.server.fanout import Fanout

MAX_PATTERN_CHANNELS = 1000
"""Channels one pattern may resume; past it the pattern starts from now, and a ``gap``
naming the pattern says so (reading more would make one reconnect a history scan)."""

RETRY_MS = 2000
"""The reconnect delay a browser is told (``retry:``) for a stream that ends without a drain
hint (its own default is about 3 s)."""


def sse_cors(allow_origin: str) -> list[tuple[bytes, bytes]]:
    """CORS headers for an ``EventSource`` on another origin (``server.cors_allow_origin``):
    ``Last-Event-ID`` is the one header it adds."""
    if not allow_origin:
        return []
    return [
        (b"Access-Control-Allow-Origin", allow_origin.encode()),
        (b"Access-Control-Allow-Headers", b"Last-Event-ID, Authorization"),
        (b"Vary", b"Origin"),
    ]


def stream_head(cors_allow_origin: str) -> bytes:
    """The response head that starts a stream: no length, so it ends when the socket does."""
    headers = [
        (b"Content-Type", b"text/event-stream; charset=utf-8"),
        (b"Cache-Control", b"no-store"),
        (b"X-Accel-Buffering", b"no"),  # nginx: pass each event on, do not buffer the stream
        (b"X-Content-Type-Options", b"nosniff"),
        *sse_cors(cors_allow_origin),
    ]
    lines = [b"HTTP/1.1 200 OK", *(name + b": " + value for name, value in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@attrs.frozen
class SseRequest:
    """An admitted ``GET /sse``: its place taken, its token checked."""

    peer: str
    origin: str | None
    grant: Grant
    channels: list[str]
    cursor: Cursor | None


class SseConnection(Connection):
    def __init__(
        self,
        context: ServerContext,
        transport: trio.abc.Stream,
        writer: Writer,
        fanout: Fanout,
        request: SseRequest,
        *,
        number: int,
        scope: trio.CancelScope | None = None,
        admission: Ticket | None = None,
    ) -> None:
        super().__init__(
            context,
            transport,
            writer,
            number=number,
            peer=request.peer,
            origin=request.origin,
            v1=True,
            scope=scope,
            grant=request.grant,
            admission=admission,
        )
        self._fanout = fanout
        self._request = request
        self._held: list[Event] | None = None
        """What the fan-out handed over while the stream started (None once it has)."""
        self._floor = 0
        self._ended = trio.Event()

    def refusal(self) -> tuple[bytes, SubscribeAction | None]:
        """The subscribe the URL asks for, checked by the session's rules (names, limits,
        namespaces): (b"", the action), or (the 4xx answering it, None)."""
        channels = self._request.channels
        frame = orjson.dumps({"type": "subscribe", "data": {"channels": channels}}).decode()
        action = self.session.receive(frame, now=trio.current_time(), wall_ms=wall_ms())
        if isinstance(action, SubscribeAction):
            return b"", action
        if isinstance(action, Reply):
            if action.notice is not None:
                self._note(action.notice)
            message = action.message
            forbidden = isinstance(message, Error) and message.code is ErrorCode.FORBIDDEN
            return response(403 if forbidden else 400, encode(message), "application/json"), None
        return response(429, b"rate limited\n"), None

    # ---- lifecycle -----------------------------------------------------------------------

    async def serve(self, nursery: trio.Nursery, action: SubscribeAction) -> None:
        context = self.context
        metrics = context.metrics
        context.registry.add(self)
        context.liveness.add(self)
        grant = self.session.grant
        if grant.expires_at is not None:
            context.expiries.expire(self, grant.expires_at)
        self.log.info("conn_open", origin=self.origin, protocol="sse", sub=grant.subject or None)
        context.events.emit("conn_open", self.id, peer=self.peer)
        metrics.sse_streams.inc()
        self.writer.attach(nursery)
        try:
            head = stream_head(context.config.server.cors_allow_origin)
            self.writer.offer(head + retry_block(RETRY_MS), force=True)
            self.send_message(self._hello())
            self.writer.flush()
            await self._start(action)
            self.writer.flush()
            if self.closing is None:
                await self._read_until_closed()
            with trio.move_on_after(context.config.server.close_timeout):
                await self.writer.wait_flushed()
        finally:
            metrics.sse_streams.dec()
            self._cleanup()
            nursery.cancel_scope.cancel()

    async def _read_until_closed(self) -> None:
        """A stream's client sends nothing after its request: read (and drop) until it goes
        away, or until the server closes the stream."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ended_then_cancel, nursery.cancel_scope)
            try:
                while await self.transport.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

    async def _ended_then_cancel(self, scope: trio.CancelScope) -> None:
        await self._ended.wait()
        scope.cancel()

    async def _start(self, action: SubscribeAction) -> None:
        """Subscribe, from the cursor if there is one, holding the feed until the hand-over."""
        context = self.context
        self._floor = self._fanout.last_seq
        self._held = []
        for key in action.added:
            context.hub.add(key, self)
        cursor = self._request.cursor
        if cursor is not None:
            await context.reader.until_ready()
            if cursor.epoch == context.reader.current_epoch():
                self._floor = max(self._floor, cursor.seq)
            positions = await self._positions(action.requested, cursor)
            action = attrs.evolve(action, recover=positions)
        try:
            await subscriptions.subscribe(self, action)
        finally:
            self._held = None

    async def _positions(self, keys: list[str], cursor: Cursor) -> dict[str, Position]:
        """Each channel to recover from the cursor: the concrete ones asked for, and those
        the broker's history has for each pattern. A channel whose newest message is older
        than the cursor recovers from that message (nothing after it: recovered, empty)."""
        reader = self.context.reader
        current = cursor.epoch == reader.current_epoch()
        latest: dict[str, int | None] = {}
        for key in keys:
            if not is_pattern(key):
                latest[key] = await reader.latest_position(key) if current else None
                continue
            try:
                found = await reader.latest_positions(key, MAX_PATTERN_CHANNELS)
            except HistoryUnavailable:
                self._pattern_not_resumed(key, cursor, "broker_unavailable")
                continue
            if found is None:
                self._pattern_not_resumed(key, cursor, "limit_exceeded")
                continue
            for channel, seq in found.items():
                latest.setdefault(channel, seq if current else None)
        return {
            channel: Position(cursor.epoch, cursor.seq if seq is None else min(cursor.seq, seq))
            for channel, seq in latest.items()
        }

    def _pattern_not_resumed(self, pattern: str, cursor: Cursor, reason: str) -> None:
        self.log.warning("sse_resume_incomplete", pattern=pattern, reason=reason)
        first, last = cursor.seq + 1, max(cursor.seq + 1, self._floor)
        self.send_frame(gap_block(pattern, first, last, reason), force=True)

    # ---- outbound ------------------------------------------------------------------------

    def send_message(self, message: ServerMessage) -> None:
        self.context.metrics.frames_sent.inc()
        self.send_frame(message_block(message, encode(message)))

    def send_handed_over(self, events: list[Event]) -> None:
        """The hand-over, in position order, merged with what the feed brought meanwhile;
        no cursor past the floor (see the module's docstring)."""
        held, self._held = self._held or [], None
        cursor = self._request.cursor
        after = cursor.seq if cursor is not None else 0
        merged: dict[tuple[str, int, bool], Event] = {}
        for event in events:
            merged.setdefault((event.channel, event.seq, not event.publication.epoch), event)
        for event in held:  # the feed's, live: those at or before the cursor the client has
            if event.seq > after or not event.publication.epoch:
                merged.setdefault((event.channel, event.seq, not event.publication.epoch), event)
        epoch = self.context.reader.current_epoch()
        # Whatever the feed has handed on by now reached this stream (held since it began),
        # or was before it began and is in the history read: safe to claim.
        floor = max(self._floor, self._fanout.last_seq)
        last = -1
        for event in sorted(merged.values(), key=lambda e: e.seq):
            position = min(event.seq, floor)
            self.send_frame(self._block(event, epoch, position), force=True)
            last = position
        self.context.metrics.frames_sent.inc(len(merged))
        if epoch and floor > last and floor > 0:
            self.send_frame(cursor_only(Cursor(epoch, floor)), force=True)

    def deliver(self, event: Event, now: float, alone: bool = False) -> bool:
        if self._held is not None:
            return self._hold(event)
        seam = self.seam
        if seam.active:
            verdict = seam.admit(event.channel, event)
            if verdict is False:
                return False
            if verdict is not True:
                self._announce_missed(verdict)
        data = event.sse
        if data is None:
            data = event.sse = self._block(event, event.publication.epoch, event.seq)
        if alone:
            result = self.writer.write_now(data, event.channel, event.seq, now)
        else:
            result = self.writer.offer(data, event.channel, event.seq, now=now)
        if result is not Offer.QUEUED and (
            result is Offer.CLOSED or not self._overflow(data, event.channel, event.seq)
        ):
            return False
        if self.tapped:
            self.context.taps.frame(self, data, event.channel, event.seq)
        self.delivered += 1
        return True

    def send_gap(self, channel: str, first: int, last: int, reason: str, frame: bytes) -> bool:  # noqa: ARG002 (a WebSocket frame)
        if self._held is not None:
            return self._hold(subscriptions.gap_event(channel, first, last, reason))
        if self.seam.active:
            missed = self.seam.gap(channel, first, last, reason)
            if missed is None:
                return False
            first, last = missed.from_seq, missed.to_seq
        return self.send_frame(gap_block(channel, first, last, reason))

    def _hold(self, event: Event) -> bool:
        held = self._held
        assert held is not None
        if len(held) >= self.writer.outbox.max_messages:
            # More arrived while the stream started than its queue holds: close it as a
            # slow consumer; its client resumes from its cursor when the burst has passed.
            self.context.metrics.slow_closed.inc()
            self.log.warning("slow_consumer", action="closed", held=len(held))
            code, label = CloseCode.POLICY_VIOLATION, "slow_consumer"
            self.request_close(code, SLOW_CONSUMER_REASON, label, discard_queue=True)
            return False
        held.append(event)
        return True

    def _block(self, event: Event, epoch: str, position: int) -> bytes:
        """An event's block: an envelope (unnamed), or, for a message that cannot be
        delivered, the gap notice its frame holds; its id the cursor at ``position``."""
        cursor = Cursor(epoch, position).encode() if epoch else b""
        name = b"gap" if event.refused is not None else b""
        return block(frame_payload(event.frame), event=name, cursor=cursor)

    def _conflated(self, channel: str, first: int, last: int) -> bytes | None:
        return gap_block(channel, first, last, "conflated")

    # ---- liveness and the end ------------------------------------------------------------

    def idle_deadline(self) -> float:
        return math.inf  # a stream's client never sends: a dead one is found by a failed write

    def ping(self) -> None:
        if self.closing is None:
            self.writer.offer(COMMENT, force=True)
            self.writer.flush()

    def request_close(
        self,
        code: int,
        reason: str,
        label: str,
        *,
        discard_queue: bool = False,
        reconnect_after_ms: int | None = None,
        timeout: float | None = None,  # noqa: ARG002 (the stream's end waits server.close_timeout)
    ) -> None:
        """End the stream: after a drain, the ``reconnect`` hint and the delay for the
        browser (``retry:``); otherwise a ``close`` event saying why. Then the socket closes
        once what is queued is written (server.close_timeout at most)."""
        if self.closing is not None:
            return
        self.closing = CloseRequest(code, reason, label)
        self._unindex()
        if discard_queue:
            dropped = self.writer.outbox.discard_events()
            self.dropped += dropped
            self.context.metrics.deliveries_dropped.labels(label).inc(dropped)
        if reconnect_after_ms is not None:
            self.send_message(Reconnect(after_ms=reconnect_after_ms, reason=reason))
            self.writer.offer(retry_block(reconnect_after_ms), force=True)
        else:
            body = orjson.dumps({"type": "close", "code": int(code), "reason": reason})
            self.writer.offer(block(body, event=b"close"), force=True)
        self.writer.flush()
        self._ended.set()

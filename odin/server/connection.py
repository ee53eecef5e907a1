"""One client connection: its tasks, its queue, its session, and how it ends.

Everything a connection holds lives in one nursery opened by the server for it: the writer
task draining its queue, trio-websocket's reader task, the heartbeat, the closer, and (in the
nursery's own task) the loop that reads client messages. Whatever ends the connection (the
client leaving, a slow-consumer or idle close, shutdown, an error) cancels that nursery, and
``run``'s ``finally`` removes it from the index and the registry without awaiting, so nothing
it held survives it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs
import trio
from trio_websocket import ConnectionClosed

from odin.protocol.close_codes import (
    IDLE_REASON,
    SLOW_CONSUMER_REASON,
    CloseCode,
)
from odin.protocol.codec import encode, text_frame
from odin.protocol.messages import Hello, Reconnect, ServerMessage
from odin.protocol.negotiation import V1_ONLY_TYPES
from odin.protocol.session import (
    Action,
    BadMessage,
    CloseAction,
    Notice,
    RateLimited,
    ReplayAction,
    Reply,
    Session,
    SubscribeAction,
    UnsubscribeAction,
)
from odin.server.fanout import Event, gap_frame
from odin.server.websocket import OdinWebSocket
from odin.server.writer import ConnectionWriter, Offer

if TYPE_CHECKING:
    from odin.server.context import ServerContext

PROTOCOL_VERSION = 1


def wall_ms() -> int:
    return int(time.time() * 1000)


@attrs.frozen
class CloseRequest:
    code: int
    reason: str
    label: str
    """Metric label for why it closed (slow_consumer, rate_limit, idle, shutdown)."""
    timeout: float


class Connection:
    def __init__(
        self,
        context: ServerContext,
        websocket: OdinWebSocket,
        writer: ConnectionWriter,
        *,
        number: int,
        peer: str,
        origin: str | None,
        v1: bool = True,
    ) -> None:
        self.context = context
        self.ws = websocket
        self.writer = writer
        self.id = f"{context.instance}-{number}"
        self.peer = peer
        self.origin = origin
        self.v1 = v1
        """Speaks Odin's protocol v1 (hello, gap, reconnect, replay_complete); otherwise only
        the message types the original server sent (odin.protocol.negotiation)."""
        self.opened_at = trio.current_time()
        self.session = Session(context.limits, context.rules, last_activity=self.opened_at)
        self.log = context.log.bind(conn=self.id, peer=peer)
        websocket.on_control_frame = self._control_frame
        self.recovering: dict[str, list[Event]] = {}
        """Channels being recovered: live events wait here until the replay is sent."""
        self.recovery_overflow: dict[str, tuple[int, int]] = {}
        self.floors: dict[str, int] = {}
        """Per recovered channel, the last position replayed: older live events are dropped."""
        self.delivered = 0
        self.dropped = 0
        self.closing: CloseRequest | None = None
        self._close_requested = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._limited_frames = 0

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve the connection until it ends; ``nursery`` is the connection's own."""
        context = self.context
        self._nursery = nursery
        context.connections[self.id] = self
        context.metrics.connections.inc()
        context.metrics.connections_active.inc()
        context.changed.unpark_all()
        self.log.info("conn_open", origin=self.origin, protocol=1 if self.v1 else 0)
        context.events.emit("conn_open", self.id, peer=self.peer)
        try:
            self.send_message(self._hello())
            nursery.start_soon(self._closer)
            nursery.start_soon(self._heartbeat)
            try:
                await self._read_loop()
            except Exception:  # a bug of ours: this connection ends with 1011, others go on
                self.log.exception("conn_error")
                self.request_close(
                    CloseCode.INTERNAL_ERROR, "internal error", "error", discard_queue=True
                )
            if self.closing is not None:
                # Our side is closing: the closer finishes the handshake, then cancels us.
                await trio.sleep_forever()
        finally:
            self._cleanup()
            nursery.cancel_scope.cancel()

    @property
    def rate_limited(self) -> int:
        """Frames of this client refused by its token bucket."""
        return self._limited_frames

    def _hello(self) -> Hello:
        config = self.context.config
        return Hello(
            version=PROTOCOL_VERSION,
            connection_id=self.id,
            ts=wall_ms(),
            limits={
                "max_subscriptions": config.connection.max_subscriptions,
                "max_message_size": config.server.max_message_size,
                "rate_limit_burst": config.connection.rate_limit_burst,
                "rate_limit_per_second": config.connection.rate_limit_per_second,
                "ping_interval": config.connection.ping_interval,
                "idle_timeout": config.connection.idle_timeout,
            },
        )

    def _cleanup(self) -> None:
        """Forget the connection everywhere. Runs under cancellation, so it never awaits."""
        context = self.context
        self.writer.mark_closed()
        self._unindex()
        self.recovering.clear()
        if context.connections.pop(self.id, None) is not None:
            context.metrics.connections_active.dec()
            context.admitted -= 1
            context.changed.unpark_all()
        code, reason, label = self._close_outcome()
        context.metrics.closed[label].inc()
        context.events.emit("conn_close", self.id, code=int(code), reason=reason, why=label)
        self.log.info(
            "conn_close",
            code=int(code),
            reason=reason,
            duration=round(trio.current_time() - self.opened_at, 3),
            delivered=self.delivered,
            dropped=self.dropped,
            rate_limited=self._limited_frames,
        )

    def _unindex(self) -> None:
        hub = self.context.hub
        hub.remove_all(self.session.subscriptions, self)
        hub.remove_all(self.recovering, self)

    def _close_outcome(self) -> tuple[int, str, str]:
        if self.closing is not None:
            return self.closing.code, self.closing.reason, self.closing.label
        closed = self.ws.closed
        if closed is None:
            return 1006, "connection lost", "client"
        if closed.code == CloseCode.MESSAGE_TOO_BIG:
            return closed.code, closed.reason or "message too big", "message_too_big"
        return closed.code, closed.reason or "", "client"

    def request_close(
        self,
        code: int,
        reason: str,
        label: str,
        *,
        discard_queue: bool = False,
        reconnect_after_ms: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Start closing: stop deliveries now, send the close frame from the closer task."""
        if self.closing is not None:
            return
        self.closing = CloseRequest(
            code, reason, label, timeout or self.context.config.server.close_timeout
        )
        self._unindex()
        if discard_queue:
            dropped = self.writer.discard_events()
            self.dropped += dropped
            self.context.metrics.dropped_slow.inc(dropped)
        if reconnect_after_ms is not None and self.v1:
            hint = Reconnect(after_ms=reconnect_after_ms, reason=reason)
            self.writer.offer(text_frame(encode(hint)), force=True)
        self._close_requested.set()

    def _control_frame(self) -> None:
        self.session.note_activity(trio.current_time())

    async def _closer(self) -> None:
        await self._close_requested.wait()
        request = self.closing
        assert request is not None
        with trio.move_on_after(request.timeout):
            await self.ws.aclose(request.code, request.reason)
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _heartbeat(self) -> None:
        """Ping on an interval; close when nothing (no frame, no pong) came for too long."""
        interval = self.context.config.connection.ping_interval
        while True:
            await trio.sleep(interval)
            deadline = self.session.idle_deadline()
            if trio.current_time() >= deadline:
                self.log.info("idle_timeout", idle=round(trio.current_time() - deadline, 3))
                self.request_close(CloseCode.IDLE_TIMEOUT, IDLE_REASON, "idle", discard_queue=True)
                return
            with trio.move_on_at(deadline):
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
                self.session.note_activity(trio.current_time())

    # ---- inbound -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        metrics = self.context.metrics
        while self.closing is None:
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return
            metrics.frames_received.inc()
            metrics.bytes_received.inc(
                len(frame) if isinstance(frame, bytes) else len(frame.encode())
            )
            action = self.session.receive(frame, now=trio.current_time(), wall_ms=wall_ms())
            await self._execute(action)

    async def _execute(self, action: Action) -> None:
        # Imported here: these modules build on Connection.
        from odin.server import replay, subscriptions

        if isinstance(action, Reply):
            if action.notice is not None:
                self._note(action.notice)
            self.send_message(action.message)
        elif isinstance(action, SubscribeAction):
            await subscriptions.subscribe(self, action)
        elif isinstance(action, UnsubscribeAction):
            subscriptions.unsubscribe(self, action)
        elif isinstance(action, ReplayAction):
            await replay.replay(self, action)
        elif isinstance(action, CloseAction):
            self.log.warning("rate_limit_abuse", code=int(action.code))
            self.request_close(action.code, action.reason, "rate_limit", discard_queue=True)

    def _note(self, notice: Notice) -> None:
        metrics = self.context.metrics
        if isinstance(notice, RateLimited):
            metrics.rate_limited.inc()
            self._limited_frames += 1
            if notice.first:
                self.context.events.emit("rate_limited", self.id)
                self.log.warning(
                    "rate_limited",
                    burst=self.context.limits.rate_burst,
                    per_second=self.context.limits.rate_per_second,
                )
        elif isinstance(notice, BadMessage):
            metrics.bad_messages.labels(notice.code.value).inc()
            if notice.first:
                self.log.info("bad_message", code=notice.code.value)

    # ---- outbound ------------------------------------------------------------------------

    def send_message(self, message: ServerMessage) -> None:
        if not self.v1 and message.TYPE in V1_ONLY_TYPES:
            return
        self.context.metrics.frames_sent.inc()
        self.send_frame(text_frame(encode(message)))

    def send_frame(
        self, frame: bytes, channel: str | None = None, seq: int = 0, *, force: bool = False
    ) -> bool:
        """Offer a frame; apply the slow-consumer policy if the queue is full."""
        result = self.writer.offer(frame, channel, seq, force=force)
        if result is Offer.FULL:
            return self._overflow(frame, channel, seq)
        return result is not Offer.CLOSED

    def deliver(self, event: Event) -> bool:
        """The fan-out's hot path: hand one event to this connection."""
        publication = event.publication
        channel = publication.channel
        if event.refused is not None and not self.v1:
            return False  # its frame is a gap notice, which only v1 clients get
        if self.recovering and channel in self.recovering:
            self._buffer_during_recovery(event)
            return False
        if self.floors:
            floor = self.floors.get(channel)
            if floor is not None:
                if publication.seq <= floor:
                    return False
                del self.floors[channel]
        result = self.writer.offer(event.frame, channel, publication.seq)
        if result is Offer.FULL and not self._overflow(event.frame, channel, publication.seq):
            return False
        if result is Offer.CLOSED:
            return False
        self.delivered += 1
        return True

    def wants(self, event: Event) -> bool:
        """Whether this client gets ``event``'s frame (gap notices only go to v1 clients)."""
        return event.refused is None or self.v1

    def send_gap(self, channel: str, frame: bytes) -> bool:
        if not self.v1:
            return False
        if self.recovering and channel in self.recovering:
            # Announced after the replay, when the recovery joins the live stream.
            return False
        return self.send_frame(frame)

    def _buffer_during_recovery(self, event: Event) -> None:
        buffer = self.recovering[event.channel]
        if len(buffer) < self.writer.max_messages:
            buffer.append(event)
            return
        first, _ = self.recovery_overflow.get(event.channel, (event.seq, 0))
        self.recovery_overflow[event.channel] = (first, event.seq)

    def _overflow(self, frame: bytes, channel: str | None, seq: int) -> bool:
        """The queue is full. Conflate (if that policy is on and it frees room) or close."""
        context = self.context
        metrics = context.metrics
        if context.config.connection.slow_consumer_policy == "conflate":
            dropped, gaps = self.writer.conflate(
                lambda ch, first, last: gap_frame(ch, first, last, "conflated") if self.v1 else None
            )
            if dropped:
                self.dropped += dropped
                metrics.slow_conflated.inc()
                metrics.dropped_conflated.inc(dropped)
                metrics.gaps["conflated"].inc(len(gaps))
                self.log.info("slow_consumer", action="conflated", dropped=dropped)
                context.events.emit("slow_consumer", self.id, action="conflated", dropped=dropped)
                if self.writer.offer(frame, channel, seq) is not Offer.FULL:
                    return True
        metrics.slow_closed.inc()
        self.dropped += 1
        self.log.warning(
            "slow_consumer",
            action="closed",
            queued_messages=self.writer.queued_messages,
            queued_bytes=self.writer.queued_bytes,
        )
        context.events.emit(
            "slow_consumer", self.id, action="closed", queued=self.writer.queued_messages
        )
        self.request_close(
            CloseCode.POLICY_VIOLATION, SLOW_CONSUMER_REASON, "slow_consumer", discard_queue=True
        )
        return False

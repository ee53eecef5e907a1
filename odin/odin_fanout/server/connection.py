"""One Odin client connection: its session, subscriptions, deliveries, and how it ends.

After the upgrade a connection is one task: ``WebSocket.run`` (websocket.py) reads frames
and hands whole messages to ``on_message``, which applies the protocol's rules (``Session``)
and carries out what they decide. Frames out go through the connection's ``Writer``, which
needs a task of its own only while the socket pushes back. Pings and idle deadlines come from
the server-wide ``Wheel`` (liveness.py). Closing is inline: the close frame is queued (after a
``reconnect`` hint for a drain), the socket reads on until the client's close arrives or the
close deadline passes, then the socket is closed.

Everything a connection holds lives in the nursery the server opened for it, and ``run``'s
``finally`` forgets it everywhere without awaiting, so cancellation always cleans up.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import attrs
import trio

from odin_fanout.core.seam import MISSED, Missed, RecoverySeam
from odin_fanout.logs import Log
from odin_fanout.protocol.access import ANONYMOUS, Grant
from odin_fanout.protocol.close_codes import (
    AUTH_REQUIRED_REASON,
    IDLE_REASON,
    SLOW_CONSUMER_REASON,
    CloseCode,
)
from odin_fanout.protocol.codec import encode, text_frame
from odin_fanout.protocol.errors import ErrorCode
from odin_fanout.protocol.messages import (
    AuthOk,
    Error,
    Hello,
    Reconnect,
    ServerMessage,
    TokenExpiring,
)
from odin_fanout.protocol.negotiation import V1_ONLY_TYPES
from odin_fanout.protocol.session import (
    Action,
    BadMessage,
    Notice,
    RateLimited,
    ReplayAction,
    Reply,
    Session,
    SubscribeAction,
    TokenAction,
    UnsubscribeAction,
)
from odin_fanout.server.expiry import Deadline
from odin_fanout.server.fanout import Event, gap_frame
from odin_fanout.server.jwks import verify_token
from odin_fanout.server.liveness import PING_FRAME
from odin_fanout.server.tokens import TokenRefused
from odin_fanout.server.websocket import PROTOCOL_ERROR_REASONS, WebSocket
from odin_fanout.server.writer import Offer, Writer

if TYPE_CHECKING:
    from odin_fanout.core.admission import Ticket
    from odin_fanout.server.context import ServerContext

PROTOCOL_VERSION = 1
# The metric label of each close code wsproto reports for what it could not parse.
_PROTOCOL_ERROR_LABELS = {
    CloseCode.PROTOCOL_ERROR: "protocol_error",
    CloseCode.INVALID_DATA: "protocol_error",
    CloseCode.MESSAGE_TOO_BIG: "message_too_big",
}


def wall_ms() -> int:
    return int(time.time() * 1000)


@attrs.frozen
class CloseRequest:
    code: int
    reason: str
    label: str
    """Metric label for why it closed (slow_consumer, rate_limit, idle, shutdown, ...)."""


class Connection:
    def __init__(
        self,
        context: ServerContext,
        transport: trio.abc.Stream,
        writer: Writer,
        *,
        number: int,
        peer: str,
        origin: str | None,
        v1: bool = True,
        trailing: bytes = b"",
        scope: trio.CancelScope | None = None,
        grant: Grant = ANONYMOUS,
        awaiting_auth: bool = False,
        admission: Ticket | None = None,
    ) -> None:
        self.context = context
        self.admission = admission
        """Its places in the per-client limits (odin_fanout.core.admission), given back at close."""
        self.transport = transport
        self.writer = writer
        self.socket = WebSocket(
            transport,
            writer,
            max_message_size=context.config.server.max_message_size,
            trailing=trailing,
            scope=scope,
        )
        self.id = f"{context.instance}-{number}"
        self.peer = peer
        self.origin = origin
        self.v1 = v1
        """Speaks Odin's protocol v1 (hello, gap, reconnect, replay_complete); otherwise only
        the message types the original server sent (odin_fanout.protocol.negotiation)."""
        self.opened_at = trio.current_time()
        self.session = Session(
            context.limits,
            context.rules,
            last_activity=self.opened_at,
            access=context.access,
            grant=grant,
            awaiting_auth=awaiting_auth,
        )
        self.seam: RecoverySeam[Event] = RecoverySeam(writer.outbox.max_messages)
        """Where recoveries join the live stream: live events held while history is read,
        and the floors below which the feed repeats what a replay already sent."""
        self.delivered = 0
        self.dropped = 0
        self.closing: CloseRequest | None = None
        self.busy = False
        """A request is being carried out (a subscribe reading the history): nothing is read
        from the client meanwhile, so its silence proves nothing."""
        self._limited_frames = 0
        self.tapped = False
        """An operator follows its frames (odin_fanout.server.tap): the only cost of taps while
        there are none is this check, once per frame queued."""

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve the connection until it ends; ``nursery`` is the connection's own."""
        context = self.context
        context.registry.add(self)
        self.tapped = bool(context.taps.channels)  # with the registry, no checkpoint between
        context.liveness.add(self)
        grant = self.session.grant
        if self.session.awaiting_auth:
            context.expiries.require_auth(self, context.config.server.handshake_timeout)
        elif grant.expires_at is not None:
            context.expiries.expire(self, grant.expires_at)
        self.log.info(
            "conn_open", origin=self.origin, protocol=1 if self.v1 else 0, sub=grant.subject or None
        )
        context.events.emit("conn_open", self.id, peer=self.peer)
        self.writer.attach(nursery)
        try:
            self.send_message(self._hello())
            self.writer.flush()
            await self.socket.run(self, context.config.server.close_timeout)
        finally:
            self._cleanup()
            nursery.cancel_scope.cancel()

    @property
    def log(self) -> Log:
        """The server's log with this connection's id and peer (made when used: a bound logger
        per idle connection is memory spent for nothing)."""
        return self.context.log.bind(conn=self.id, peer=self.peer)

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
        context.liveness.discard(self)
        context.expiries.discard(self)
        if self.admission is not None:
            self.admission.release(trio.current_time())
        context.registry.remove(self)
        code, reason, label = self._close_outcome()
        if self.tapped:
            context.taps.closed(self, int(code), reason, label)
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
        hub.remove_all(self.seam.clear(), self)

    def _close_outcome(self) -> tuple[int, str, str]:
        if self.closing is not None:
            return self.closing.code, self.closing.reason, self.closing.label
        remote = self.socket.remote_close
        if remote is None:
            return 1006, "connection lost", "client"
        return remote[0], remote[1], "client"

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
        """Start closing: stop deliveries now, queue the close frame, and give the client
        ``timeout`` seconds (server.close_timeout) to answer it."""
        if self.closing is not None:
            return
        self.closing = CloseRequest(code, reason, label)
        self._unindex()
        if discard_queue and self.socket.open:
            # Events not sent, and whatever was queued after the first of them (notices and
            # acks past them would mislead the client's recovery); counted: the events. Not
            # once the peer's close came: the answer to it is queued and must go.
            dropped = self.writer.outbox.discard_events()
            self.dropped += dropped
            self.context.metrics.deliveries_dropped.labels(label).inc(dropped)
        if reconnect_after_ms is not None and self.v1 and self.socket.open:
            hint = text_frame(encode(Reconnect(after_ms=reconnect_after_ms, reason=reason)))
            self.socket.send(hint)
            if self.tapped:
                self.context.taps.frame(self, hint, None)
        self.socket.close(code, reason, timeout or self.context.config.server.close_timeout)

    # ---- liveness (the server's wheel calls these) ------------------------------------------

    def idle_deadline(self) -> float:
        if self.busy:
            return math.inf
        return self.session.idle_deadline()

    def ping(self) -> None:
        if self.closing is None:
            self.writer.offer(PING_FRAME, force=True)

    def on_deadline(self, kind: Deadline) -> None:
        """A token deadline came (the server's ``Expiries`` task calls this)."""
        metrics = self.context.metrics
        grant = self.session.grant
        if kind == "expiring":
            if grant.expires_at is not None:
                left = grant.expires_at - time.time()
                self.send_message(
                    TokenExpiring(expires_at=int(grant.expires_at * 1000), in_ms=int(left * 1000))
                )
                self.writer.flush()
        elif kind == "expired":
            metrics.auth_refused["token_expired"].inc()
            self.log.info("token_expired", sub=grant.subject or None)
            self.request_close(CloseCode.TOKEN_EXPIRED, "token expired", "token_expired")
        else:
            metrics.auth_refused["auth_timeout"].inc()
            self.log.info("auth_timeout")
            self.request_close(CloseCode.AUTH_REQUIRED, AUTH_REQUIRED_REASON, "auth")

    async def _take_token(self, action: TokenAction) -> None:
        """``auth`` or ``refresh``: verify the token, then adopt what it grants."""
        context = self.context
        session = self.session
        kind = "refresh" if action.refresh else "auth"
        try:
            grant = await verify_token(
                context.verifier, context.jwks, context.config.auth, action.token
            )
        except TokenRefused as exc:
            context.metrics.auth_refused[exc.reason].inc()
            self.log.info("auth_refused", reason=exc.reason, via=kind)
            if session.awaiting_auth:
                self.request_close(CloseCode.TOKEN_INVALID, f"token invalid: {exc.reason}", "auth")
                return
            error = Error(code=ErrorCode.UNAUTHORIZED, message=f"token refused: {exc.reason}",
                          request=kind, id=action.request_id)  # fmt: skip
            self.send_message(error)
            return
        ticket = self.admission
        # A token sent in-band counts against its user's limit like one in the request.
        if (
            not action.refresh
            and ticket is not None
            and ticket.subject is None
            and grant.subject
            and not ticket.admit_subject(grant.subject)
        ):
            context.metrics.rejected["per_subject"].inc()
            self.log.warning("admission_refused", reason="per_subject", detail=grant.subject)
            reason = "too many connections for this user"
            self.request_close(CloseCode.POLICY_VIOLATION, reason, "auth")
            return
        problem = session.take_grant(grant, refresh=action.refresh)
        if problem is not None:
            code, message = problem
            self.send_message(Error(code=code, message=message, request=kind, id=action.request_id))
            return
        if grant.expires_at is not None:
            context.expiries.expire(self, grant.expires_at)
        else:
            context.expiries.discard(self)
        self.log.info("token_taken", via=kind, sub=grant.subject or None)
        expires = int(grant.expires_at * 1000) if grant.expires_at is not None else None
        self.send_message(AuthOk(sub=grant.subject, expires_at=expires, id=action.request_id))

    def close_idle(self, now: float) -> None:
        self.log.info("idle_timeout", idle=round(now - self.session.last_activity, 3))
        self.request_close(CloseCode.IDLE_TIMEOUT, IDLE_REASON, "idle", discard_queue=True)

    # ---- inbound (WebSocket.run calls these) ----------------------------------------------

    def on_activity(self, now: float) -> None:
        self.session.note_activity(now)

    def on_protocol_error(self, code: CloseCode, detail: str) -> None:
        self.log.info("protocol_error", code=int(code), detail=detail)
        self.request_close(
            code,
            PROTOCOL_ERROR_REASONS[code],
            _PROTOCOL_ERROR_LABELS[code],
            discard_queue=True,
        )

    async def on_message(self, message: str | bytes) -> None:
        metrics = self.context.metrics
        metrics.frames_received.inc()
        size = len(message) if isinstance(message, bytes) else len(message.encode())
        metrics.bytes_received.inc(size)
        action = self.session.receive(message, now=trio.current_time(), wall_ms=wall_ms())
        self.busy = True
        try:
            await self._execute(action)
        except Exception:  # a bug of ours: this connection ends with 1011, others go on
            self.log.exception("conn_error")
            self.request_close(
                CloseCode.INTERNAL_ERROR, "internal error", "error", discard_queue=True
            )
        finally:
            self.busy = False
            # The pongs and frames that came while we were not reading are read next: the
            # idle clock starts again from here, not from before the request.
            self.session.note_activity(trio.current_time())

    async def _execute(self, action: Action) -> None:
        # Imported here: these modules build on Connection.
        from odin_fanout.server import replay, subscriptions

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
        elif isinstance(action, TokenAction):
            await self._take_token(action)
        elif action.code is CloseCode.AUTH_REQUIRED:
            self.context.metrics.auth_refused["missing"].inc()
            self.log.info("auth_required")
            self.request_close(action.code, action.reason, "auth", discard_queue=True)
        else:
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
            if notice.code is ErrorCode.FORBIDDEN:
                metrics.auth_refused["forbidden"].inc()
            if notice.first:
                self.log.info("bad_message", code=notice.code.value)

    # ---- outbound ------------------------------------------------------------------------

    def send_message(self, message: ServerMessage) -> None:
        if not self.v1 and message.TYPE in V1_ONLY_TYPES:
            return
        self.context.metrics.frames_sent.inc()
        self.send_frame(text_frame(encode(message)))

    def send_frame(
        self,
        frame: bytes,
        channel: str | None = None,
        seq: int = 0,
        *,
        force: bool = False,
        gap: tuple[str, int, int, str] | None = None,
    ) -> bool:
        """Queue a frame; apply the slow-consumer policy if the queue is full. ``gap``: the
        frame is that gap notice (conflation merges it with its channel's dropped events)."""
        result = self.writer.offer(frame, channel, seq, force=force, gap=gap)
        if result is Offer.FULL:
            queued = self._overflow(frame, channel, seq, gap)
        else:
            queued = result is not Offer.CLOSED
        if queued and self.tapped:
            self.context.taps.frame(self, frame, channel or (gap[0] if gap else None), seq)
        return queued

    def deliver(self, event: Event, now: float, alone: bool = False) -> bool:
        """The fan-out's hot path: hand one event to this connection. ``alone``: the only
        event of its batch, written at once rather than queued for the batch's flush."""
        if event.refused is not None and not self.v1:
            return False  # its frame is a gap notice, which only v1 clients get
        seam = self.seam
        if seam.active:
            verdict = seam.admit(event.channel, event)
            if verdict is False:
                return False
            if verdict is not True:  # the first message past a hand-over skipped positions
                self._announce_missed(verdict)
        if alone:
            result = self.writer.write_now(event.frame, event.channel, event.seq, now)
        else:
            result = self.writer.offer(event.frame, event.channel, event.seq, now=now)
        if result is not Offer.QUEUED and (
            result is Offer.CLOSED or not self._overflow(event.frame, event.channel, event.seq)
        ):
            return False
        if self.tapped:
            self.context.taps.frame(self, event.frame, event.channel, event.seq)
        self.delivered += 1
        return True

    def _announce_missed(self, missed: Missed) -> None:
        channel, first, last = missed.channel, missed.from_seq, missed.to_seq
        frame = gap_frame(channel, first, last, MISSED)
        if self.send_gap(channel, first, last, MISSED, frame):
            self.context.metrics.gaps[MISSED].inc()

    def send_handed_over(self, events: list[Event]) -> None:
        """Queue, in order and past the queue's bound, what a subscribe hands over after its
        ack: recovered messages, the live ones held meanwhile, gap notices. Forced frames do
        not count against the bound, so the live messages that follow still have all of it."""
        sends = [event for event in events if self.wants(event)]
        for event in sends:
            if event.refused is None:
                self.send_frame(event.frame, event.channel, event.seq, force=True)
                continue
            # A notice: for a refused publication its own position; for a range the seam
            # missed (subscriptions.gap_event, no epoch) prev+1..seq.
            first = event.seq if event.publication.epoch else event.prev + 1
            gap = (event.channel, first, event.seq, event.refused)
            self.send_frame(event.frame, force=True, gap=gap)
        self.context.metrics.frames_sent.inc(len(sends))

    def wants(self, event: Event) -> bool:
        """Whether this client gets ``event``'s frame (gap notices only go to v1 clients)."""
        return event.refused is None or self.v1

    def send_gap(self, channel: str, first: int, last: int, reason: str, frame: bytes) -> bool:
        """Announce positions ``first``..``last`` that will not come (v1 clients only); held
        in line while the channel is recovered, cut to what a replay did not already give."""
        if not self.v1:
            return False
        if self.seam.active:
            missed = self.seam.gap(channel, first, last, reason)
            if missed is None:
                return False
            if (missed.from_seq, missed.to_seq) != (first, last):
                first, last = missed.from_seq, missed.to_seq
                frame = gap_frame(channel, first, last, reason)
        return self.send_frame(frame, gap=(channel, first, last, reason))

    def _conflated(self, channel: str, first: int, last: int) -> bytes | None:
        """What takes the place of messages conflation dropped: a gap notice (v1)."""
        if not self.v1:
            return None
        frame = gap_frame(channel, first, last, "conflated")
        if self.tapped:  # shown when made, after the events it stands for
            self.context.taps.frame(self, frame, channel, last)
        return frame

    def _overflow(
        self,
        frame: bytes,
        channel: str | None,
        seq: int,
        gap: tuple[str, int, int, str] | None = None,
    ) -> bool:
        """The queue is full. Conflate (if that policy is on and it frees room) or close."""
        context = self.context
        metrics = context.metrics
        outbox = self.writer.outbox
        if context.config.connection.slow_consumer_policy == "conflate":
            dropped, gaps = outbox.conflate(self._conflated)
            if dropped:
                self.dropped += dropped
                metrics.slow_conflated.inc()
                metrics.dropped_conflated.inc(dropped)
                metrics.gaps["conflated"].inc(len(gaps))
                self.log.info("slow_consumer", action="conflated", dropped=dropped)
                context.events.emit("slow_consumer", self.id, action="conflated", dropped=dropped)
                if self.writer.offer(frame, channel, seq, gap=gap) is not Offer.FULL:
                    return True
        metrics.slow_closed.inc()
        self.dropped += 1
        self.log.warning(
            "slow_consumer",
            action="closed",
            queued_messages=len(outbox),
            queued_bytes=outbox.queued_bytes,
        )
        context.events.emit("slow_consumer", self.id, action="closed", queued=len(outbox))
        self.request_close(
            CloseCode.POLICY_VIOLATION, SLOW_CONSUMER_REASON, "slow_consumer", discard_queue=True
        )
        return False

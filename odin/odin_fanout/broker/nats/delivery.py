"""JetStream deliveries read on a Trio connection of their own: the ingest firehose.

Why not nats-py here: through trio-asyncio its delivery path (protocol parser, per-message
``Msg``, a callback coroutine per message scheduled through the trio-asyncio loop) collapses
past about 20k msg/s on this machine even with nothing behind it, dropping most messages;
this reader keeps up with 50k with the whole fan-out behind it (docs/performance.md, "NATS
ingest"). The NATS text protocol needed to read one push consumer is small (INFO, CONNECT,
SUB, MSG, HMSG, PING/PONG), so this module speaks it directly, in Trio, and does what
nats-py's ordered consumer does: it checks consumer sequences, answers flow control, watches
idle heartbeats, and recreates the consumer from the next stream position after any gap,
reconnection or silence. nats-py keeps everything else (stream management, history reads,
publishing), where a message costs one call, not one per message.

In a cluster, how soon the delivery resumes after a node is lost (it starts after the last
position handed on, so nothing is lost or repeated):

- The node this connection is on: the link reconnects to another known node (it learns them
  from the servers' INFO, see ``link.py``) after ``2 * nats.reconnect_wait_min`` at most
  (0.5 s by default; at once when the node announced lame-duck mode), and recreates the
  consumer as part of connecting. Measured on loopback: 0.1-0.2 s.
- Another node (the one holding the consumer, perhaps): the servers announce it in an INFO
  as soon as its routes close, and the consumer is recreated then; a node cut off silently
  is noticed by two missed idle heartbeats (``2 * nats.consumer_heartbeat``).
- When the lost node was JetStream's meta leader (creating a consumer needs it) or led the
  stream, nobody can create consumers or read the stream until the others elect a new one
  (nats-server's Raft election: measured 2.5-9 s on loopback). The API calls time out after
  ``API_TIMEOUT`` (1 s) and are retried at once, so the consumer comes about a second after
  the election at most; after ``CREATE_PATIENCE`` (10 s) of failures the link moves on to
  another node.

So: about half a second plus, when the lost node led JetStream or the stream, that election.
The consumer itself is in memory with one replica: a replicated consumer would survive the
node only after an election of its own (seconds, and it too needs the meta leader to be
recreated) and replicate every delivery, while a new one from the next position is exact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import trio

from odin_fanout.broker.nats.link import ConnectionLost, Link, LinkSettings
from odin_fanout.broker.nats.protocol import HMSG, MSG, Op, header_fields, status
from odin_fanout.config import NatsAddress
from odin_fanout.logs import Log

API_TIMEOUT = 1.0
"""Seconds a JetStream API call made to (re)create the consumer may take."""
CREATE_PATIENCE = 10.0
"""Seconds of failed tries to create the consumer on one connection before moving to another
server: longer than a JetStream leader election."""

# Called for each delivered message, in order: subject, stream sequence, timestamp (Unix
# seconds), payload. It returns None when done, or an awaitable to
# finish (rarely: the first message of a channel needs a look at the stream).
OnMessage = Callable[[bytes, int, float, bytes], Awaitable[None] | None]
# Called with the stream's info (STREAM.INFO as JSON) before each consumer is created, and
# the position the consumer will start after. True means it is not the history being read
# (the stream was recreated): read it from its start.
OnStream = Callable[[dict[str, Any], int], bool]
# Called when the messages of a read have all been handed to ``OnMessage``: None, or an
# awaitable to finish before the next read (the messages it held back, delivered).
OnBatchEnd = Callable[[], Awaitable[None] | None]

NOTHING = "odin.token._.none"
"""The filter of a consumer nobody wants anything from: a subject within the stream's that
no publisher can use (``_`` is not a symbol), so the consumer exists, beats and can be
widened, but sends nothing."""


@attrs.define
class DeliverySettings:
    stream: str
    filter_subjects: list[str]
    """The subjects to deliver at first; ``set_filters`` changes them."""
    heartbeat: float
    """The consumer's idle heartbeat; two missed ones recreate it."""


class Delivery(Link):
    """A JetStream push consumer of the stream's wanted subjects, in stream order, for ever."""

    def __init__(
        self,
        settings: DeliverySettings,
        link: LinkSettings,
        on_message: OnMessage,
        on_stream: OnStream,
        log: Log,
        on_batch_end: OnBatchEnd | None = None,
    ) -> None:
        super().__init__(link, log, "delivery")
        self._settings = settings
        self._on_message = on_message
        self._on_stream = on_stream
        self._on_batch_end = on_batch_end
        self.ready = trio.Event()
        """Set the first time the consumer is delivering."""
        self.last_stream_seq = 0
        """The last stream position delivered; a recreated consumer starts after it."""
        self.considered = 0
        """The last stream position the consumer has looked at with everything it matched
        delivered and handed on (an idle heartbeat says how far it got): a consumer recreated
        with other filters starts after it, so a channel just added does not bring back every
        message it had since the last delivery of another."""
        self._filters = list(settings.filter_subjects) or [NOTHING]
        self._filters_asked = 0
        self._filters_applied = 0
        self._filters_changed = trio.Event()
        self._policy = "new"
        self._deliver_prefix = f"_odin.deliver.{self._token}"
        self._deliver_sid_bytes = b""
        """The subscription of the current consumer's deliveries (empty: none now)."""
        self._subscribed_sid = 0
        self._last_reply = b""
        self._next_sid = 2
        self._consumer = ""
        self._last_consumer_seq = 0
        self._active = False
        self._reset = trio.Event()
        self.resumes = 0
        """Consumers recreated to resume after a lost connection, node or delivery (not for a
        change of filters)."""

    def restart(self, policy: str) -> None:
        """Recreate the consumer (``all`` for a new stream, ``next`` after a gap)."""
        if policy == "all":
            self.considered = 0
        self._policy = policy
        self._reset.set()

    @property
    def filters(self) -> list[str]:
        """The subjects the consumer is asked to deliver (``NOTHING`` for none)."""
        return list(self._filters)

    async def set_filters(self, subjects: list[str]) -> None:
        """Deliver ``subjects`` from now on; return once a consumer with them is delivering
        (every message stored from then on that they match will come). Each change is a new
        consumer from the next position: exact, and as cheap as a consumer update."""
        self._filters = list(subjects) or [NOTHING]
        self._filters_asked += 1
        asked = self._filters_asked
        self.restart("next")
        while self._filters_applied < asked:
            self._filters_changed = changed = trio.Event()
            await changed.wait()

    async def _connected(self, nursery: trio.Nursery) -> None:
        # Always a new consumer on a new connection: the old one may have gone with a node,
        # and its deliveries went to the connection that was lost.
        self._reset = trio.Event()
        await self._recreate_consumer()
        self.ready.set()
        nursery.start_soon(self._watch_consumer)

    def _servers_lost(self, lost: list[NatsAddress]) -> None:  # noqa: ARG002
        # The consumer may have been on one of them: do not wait for its heartbeats. The
        # policy stays as it is (a restart asked for from the start stays from the start).
        self._reset.set()

    # ---- the protocol ----------------------------------------------------------------------

    def _handle(self, ops: list[Op], index: int) -> tuple[int, Awaitable[None] | None]:
        """Handle ``ops`` from ``index``, synchronously: the per-message path, written with
        locals and without awaits because it runs 50k times a second. Returns where it
        stopped and, when it stopped for one, an awaitable to finish before going on (a
        channel's first message, a reply to send)."""
        on_message = self._on_message
        deliver_sid = self._deliver_sid_bytes
        last_consumer_seq = self._last_consumer_seq
        last_reply = b""
        follow_up: Awaitable[None] | None = None
        stop = len(ops)
        for i in range(index, stop):
            kind, subject, sid, reply, _, payload = ops[i]
            if kind == HMSG:
                if sid != deliver_sid or not reply.startswith(b"$JS.ACK."):
                    # A status: flow control, heartbeat, or an API reply.
                    follow_up = self._status(ops[i])
                    if follow_up is not None:
                        stop = i + 1
                        break
                    continue
                # Otherwise a stored message with headers (Nats-Msg-Id, ...).
            elif kind != MSG:
                follow_up = self._control(ops[i])
                if follow_up is not None:
                    stop = i + 1
                    break
                continue
            elif sid != deliver_sid or not reply:
                if sid == b"1":
                    self._reply(subject, payload)
                continue  # otherwise a delivery of a consumer we have replaced
            tokens = reply.split(b".")
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or with
            # <domain>.<account hash> after ACK (and a random token at the end).
            if len(tokens) != 9:
                del tokens[2:4]
            consumer_seq = int(tokens[6])
            if consumer_seq != last_consumer_seq + 1:
                # The server skipped a delivery: start again after the last one handed on.
                self.restart("next")
                deliver_sid = self._deliver_sid_bytes = b""
                continue
            last_consumer_seq = consumer_seq
            last_reply = reply
            seq = int(tokens[5])
            self.last_stream_seq = seq
            follow_up = on_message(subject, seq, int(tokens[7]) / 1e9, payload)
            if follow_up is not None:
                stop = i + 1
                break
        else:
            if self._on_batch_end is not None:
                follow_up = self._on_batch_end()
        self._last_consumer_seq = last_consumer_seq
        if last_reply:
            self._active = True
            self._last_reply = last_reply
        return stop, follow_up

    @property
    def pending(self) -> int:
        """Messages of the stream not yet delivered, as of the last delivery (parsed here, on
        demand, rather than for every message)."""
        tokens = self._last_reply.split(b".")
        if len(tokens) < 9:
            return 0
        return int(tokens[8] if len(tokens) == 9 else tokens[10])

    def _status(self, op: Op) -> Awaitable[None] | None:
        """A message with headers: a JetStream API reply, or the consumer's flow control and
        idle heartbeats (``NATS/1.0 100 ...``, on the delivery subject)."""
        _, _, sid, reply, headers, _ = op
        if sid == b"1":
            self._reply_op(op)
            return None
        if sid != self._deliver_sid_bytes or status(headers)[0] != 100:
            return None
        self._active = True
        if reply and b"FlowControl" in headers[:40]:
            # Everything before it has been handed on: let the server send more.
            return self._send(b"PUB " + reply + b" 0\r\n\r\n")
        # An idle heartbeat: it names the last delivery sent, and a flow control request
        # that was missed (the consumer is stalled until it is answered).
        fields = header_fields(headers)
        last = fields.get(b"Nats-Last-Consumer")
        if last is not None and int(last) != self._last_consumer_seq:
            self.restart("next")
        elif last is not None and (looked_at := fields.get(b"Nats-Last-Stream")) is not None:
            # Everything up to there that the filters match has been handed on.
            self.considered = max(self.considered, int(looked_at))
        stalled = fields.get(b"Nats-Consumer-Stalled")
        if stalled is not None:
            return self._send(b"PUB " + stalled + b" 0\r\n\r\n")
        return None

    # ---- the consumer ----------------------------------------------------------------------

    async def _watch_consumer(self) -> None:
        """Recreate the consumer on request, or when it went silent (two heartbeats): a
        restarted server has lost it."""
        while True:
            self._active = False
            with trio.move_on_after(self._settings.heartbeat * 2):
                await self._reset.wait()
            if self._reset.is_set() or not self._active:
                self._reset = trio.Event()
                await self._recreate_consumer()

    async def _recreate_consumer(self) -> None:
        """Create the consumer, retrying on this connection while JetStream elects leaders
        after a node loss (a consumer needs the meta leader, its info the stream's); after
        ``CREATE_PATIENCE`` this server is given up (it may be cut off from the rest)."""
        give_up = trio.current_time() + CREATE_PATIENCE
        while True:
            try:
                await self._create_consumer()
                return
            except ConnectionLost as exc:
                if trio.current_time() >= give_up:
                    raise
                self._log.info("nats_consumer_retry", error=str(exc))
                await trio.sleep(0.1)

    async def _create_consumer(self) -> None:
        settings = self._settings
        previous = self._consumer
        # The stream first: if it was recreated while we were away (by another Odin, an
        # operator, a server that lost its memory storage), reading on from our last
        # position would mix two histories under one epoch.
        info = orjson.loads(
            await self.request(f"$JS.API.STREAM.INFO.{settings.stream}", b"", API_TIMEOUT)
        )
        if "error" in info:
            raise ConnectionLost(f"stream: {info['error'].get('description', info['error'])}")
        after = max(self.last_stream_seq, self.considered)
        if self._on_stream(info, after):
            self._policy = "all"
            self.last_stream_seq = self.considered = after = 0
        sid = self._next_sid
        self._next_sid += 1
        deliver_subject = f"{self._deliver_prefix}.{sid}"
        config: dict[str, object] = {
            "deliver_subject": deliver_subject,
            "ack_policy": "none",
            "max_deliver": 1,
            "flow_control": True,
            "idle_heartbeat": int(settings.heartbeat * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
            "filter_subjects": self._filters,
            "inactive_threshold": int(max(30.0, settings.heartbeat * 10) * 1e9),
        }
        asked = self._filters_asked
        filters_only = asked != self._filters_applied
        if self._policy == "next" and after:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=after + 1)
        else:
            config["deliver_policy"] = self._policy if self._policy in ("new", "all") else "new"
        self._policy = "next"
        self._last_consumer_seq = 0
        unsubscribe = f"UNSUB {self._subscribed_sid}\r\n" if self._subscribed_sid else ""
        self._subscribed_sid = sid
        self._deliver_sid_bytes = str(sid).encode()
        await self._send(f"{unsubscribe}SUB {deliver_subject} {sid}\r\n".encode())
        reply = orjson.loads(
            await self.request(
                f"$JS.API.CONSUMER.CREATE.{settings.stream}",
                orjson.dumps({"stream_name": settings.stream, "config": config}),
                API_TIMEOUT,
            )
        )
        if "error" in reply:
            raise ConnectionLost(f"consumer: {reply['error'].get('description', reply['error'])}")
        self._consumer = reply["name"]
        self._filters_applied = asked
        self._filters_changed.set()
        if previous and not filters_only:  # a change of filters is the server's to log
            self.resumes += 1
            self._log.info("nats_consumer_recreated", start=config.get("opt_start_seq"))
        if previous:
            await self._send(
                f"PUB $JS.API.CONSUMER.DELETE.{settings.stream}.{previous} 0\r\n\r\n".encode()
            )

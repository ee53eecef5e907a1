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
"""

from __future__ import annotations

import contextlib
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import trio

from odin.config import NatsAddress
from odin.logs import Log

# Called for each delivered message, in order: subject, stream sequence, timestamp (Unix
# seconds), payload. It returns None when done, or an awaitable to
# finish (rarely: the first message of a channel needs a look at the stream).
OnMessage = Callable[[bytes, int, float, bytes], Awaitable[None] | None]
# Called with the stream's info (STREAM.INFO as JSON) before each consumer is created. True
# means it is not the history being read (the stream was recreated): read it from its start.
OnStream = Callable[[dict[str, Any]], bool]

_READ_SIZE = 256 * 1024
# Messages parsed between checkpoints (a read can hold a couple of thousand).
_YIELD_EVERY = 256
_MAX_CONTROL_LINE = 64 * 1024


class ConnectionLost(Exception):
    """The delivery connection failed or went silent."""


_LOST = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ConnectionLost,
)


@attrs.define
class DeliverySettings:
    servers: list[NatsAddress]
    stream: str
    filter_subject: str
    heartbeat: float
    """The consumer's idle heartbeat; two missed ones recreate it."""
    ping_interval: float
    max_outstanding_pings: int
    connect_timeout: float
    reconnect_wait_min: float
    reconnect_wait_max: float
    request_timeout: float = 5.0


class Delivery:
    """A JetStream push consumer of the whole stream, in stream order, for ever."""

    def __init__(
        self, settings: DeliverySettings, on_message: OnMessage, on_stream: OnStream, log: Log
    ) -> None:
        self._settings = settings
        self._on_message = on_message
        self._on_stream = on_stream
        self._log = log.bind(connection="delivery")
        self.connected = False
        self.ready = trio.Event()
        """Set the first time the consumer is delivering."""
        self.last_stream_seq = 0
        """The last stream position delivered; a recreated consumer starts after it."""
        self._policy = "new"
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.StrictFIFOLock()
        token = secrets.token_hex(8)
        self._inbox = f"_INBOX.odin{token}"
        """Replies to our JetStream API requests arrive under this prefix (subscription 1)."""
        self._deliver_prefix = f"_odin.deliver.{token}"
        self._replies: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._request_number = 0
        self._deliver_sid_bytes = b""
        """The subscription of the current consumer's deliveries (empty: none now)."""
        self._subscribed_sid = 0
        self._last_reply = b""
        self._next_sid = 2
        self._consumer = ""
        self._last_consumer_seq = 0
        self._active = False
        self._outstanding_pings = 0
        self._reset = trio.Event()
        self.consumers_created = 0

    def restart(self, policy: str) -> None:
        """Recreate the consumer (``all`` for a new stream, ``next`` after a gap)."""
        self._policy = policy
        self._reset.set()

    # ---- connection ----------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        while True:
            server = self._settings.servers[attempt % len(self._settings.servers)]
            failures: list[BaseException] = []
            was_connected = False
            try:
                with trio.fail_after(self._settings.connect_timeout):
                    stream = await trio.open_tcp_stream(server.host, server.port)
                try:
                    await self._serve(stream, server)
                finally:
                    was_connected, self.connected = self.connected, False
                    self._stream = None
                    await trio.aclose_forcefully(stream)
            except* _LOST as group:  # grouped: it may come from any task of the connection
                failures.extend(group.exceptions)
            if failures and (was_connected or attempt == 0):  # not every failed retry
                self._log.warning(
                    "nats_delivery_lost",
                    server=f"{server.host}:{server.port}",
                    error=repr(failures[0]),
                )
            attempt = 1 if was_connected else attempt + 1
            settings = self._settings
            wait = min(
                settings.reconnect_wait_max, settings.reconnect_wait_min * 2 ** min(attempt, 16)
            )
            await trio.sleep(wait * random.uniform(0.5, 1.0))

    async def _serve(self, stream: trio.SocketStream, server: NatsAddress) -> None:
        self._stream = stream
        buffer = bytearray()
        with trio.fail_after(self._settings.connect_timeout):
            line = await self._read_line(stream, buffer)
            if not line.startswith(b"INFO "):
                raise ConnectionLost(f"unexpected greeting {line[:40]!r}")
            connect: dict[str, object] = {
                "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                "name": "odin-delivery", "lang": "python", "version": "odin", "protocol": 1,
            }  # fmt: skip
            if server.user:
                connect.update(user=server.user, **{"pass": server.password})
            elif server.token:
                connect["auth_token"] = server.token
            await self._send(
                b"CONNECT " + orjson.dumps(connect) + b"\r\nSUB " + self._inbox.encode()
                + b".* 1\r\nPING\r\n"
            )  # fmt: skip
            while (line := await self._read_line(stream, buffer)) != b"PONG":
                if line.startswith(b"-ERR"):
                    raise ConnectionLost(line.decode(errors="replace"))
        self._outstanding_pings = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop, stream, buffer)
            nursery.start_soon(self._ping_loop)
            await self._create_consumer()
            self.connected = True
            self.ready.set()
            nursery.start_soon(self._watch_consumer)

    async def _read_line(self, stream: trio.SocketStream, buffer: bytearray) -> bytes:
        while (end := buffer.find(b"\r\n")) < 0:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                raise ConnectionLost("closed by the server")
            buffer += data
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        return line

    async def _send(self, data: bytes) -> None:
        stream = self._stream
        if stream is None:
            raise ConnectionLost("not connected")
        async with self._send_lock:
            await stream.send_all(data)

    async def _ping_loop(self) -> None:
        """A connection that answers no ping for a while is gone, even if the socket says
        nothing (a silent partition)."""
        while True:
            await trio.sleep(self._settings.ping_interval)
            if self._outstanding_pings >= self._settings.max_outstanding_pings:
                raise ConnectionLost("no PONG from the server")
            self._outstanding_pings += 1
            await self._send(b"PING\r\n")

    # ---- the protocol ----------------------------------------------------------------------

    async def _read_loop(self, stream: trio.SocketStream, buffer: bytearray) -> None:
        data = bytes(buffer)
        position = 0
        while True:
            position, follow_up, short = self._parse(data, position)
            if follow_up is not None:
                await follow_up
                continue
            if not short:
                # A full batch: let the fan-out take what we handed it, so neither side runs
                # away. (Receiving below is a checkpoint too.)
                await trio.lowlevel.checkpoint()
                continue
            if len(data) - position > _MAX_CONTROL_LINE and data.find(b"\r\n", position) < 0:
                raise ConnectionLost("control line too long")
            more = await stream.receive_some(_READ_SIZE)
            if not more:
                raise ConnectionLost("closed by the server")
            data = data[position:] + more if position < len(data) else more
            position = 0

    def _parse(self, data: bytes, position: int) -> tuple[int, Awaitable[None] | None, bool]:
        """Handle the complete operations in ``data`` from ``position``, synchronously: the
        per-message path, written with locals and without awaits because it runs 50k times a
        second. Returns where it stopped; when it stopped for one, an awaitable to finish before
        going on (a channel's first message, a reply to send); and whether it stopped short of
        a whole operation (read more). At most ``_YIELD_EVERY`` operations per call, so the
        caller checkpoints between batches."""
        find = data.find
        on_message = self._on_message
        deliver_sid = self._deliver_sid_bytes
        last_consumer_seq = self._last_consumer_seq
        last_reply = b""
        follow_up: Awaitable[None] | None = None
        short = True
        for _ in range(_YIELD_EVERY):
            end = find(b"\r\n", position)
            if end < 0:
                break
            if data[position] == 77:  # "M": MSG <subject> <sid> [reply] <size>
                parts = data[position + 4 : end].split(b" ")
                start = end + 2
                stop = start + int(parts[-1])
                if len(data) < stop + 2:
                    break  # the payload has not all arrived
                position = stop + 2
                if parts[1] != deliver_sid or len(parts) != 4:
                    if parts[1] == b"1":
                        self._reply(parts[0], data[start:stop])
                    continue  # otherwise a delivery of a consumer we have replaced
                tokens = parts[2].split(b".")
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
                last_reply = parts[2]
                seq = int(tokens[5])
                self.last_stream_seq = seq
                follow_up = on_message(parts[0], seq, int(tokens[7]) / 1e9, data[start:stop])
                if follow_up is not None:
                    break
            elif data[position] == 72:  # "H": HMSG <subject> <sid> [reply] <hsize> <size>
                parts = data[position + 5 : end].split(b" ")
                start = end + 2
                stop = start + int(parts[-1])
                if len(data) < stop + 2:
                    break
                position = stop + 2
                header_end = start + int(parts[-2])
                follow_up = self._status(parts, data[start:header_end], data[header_end:stop])
                if follow_up is not None:
                    break
            else:
                line = data[position:end]
                position = end + 2
                follow_up = self._control(line)
                if follow_up is not None:
                    break
        else:
            short = False
        self._last_consumer_seq = last_consumer_seq
        if last_reply:
            self._active = True
            self._last_reply = last_reply
        return position, follow_up, short

    @property
    def pending(self) -> int:
        """Messages of the stream not yet delivered, as of the last delivery (parsed here, on
        demand, rather than for every message)."""
        tokens = self._last_reply.split(b".")
        if len(tokens) < 9:
            return 0
        return int(tokens[8] if len(tokens) == 9 else tokens[10])

    def _control(self, line: bytes) -> Awaitable[None] | None:
        if line == b"PING":
            return self._send(b"PONG\r\n")
        if line == b"PONG":
            self._outstanding_pings = 0
        elif line.startswith(b"-ERR"):
            raise ConnectionLost(line.decode(errors="replace"))
        return None  # +OK and asynchronous INFO need nothing.

    def _status(self, parts: list[bytes], headers: bytes, payload: bytes) -> Awaitable[None] | None:
        """A message with headers: a JetStream API reply, or the consumer's flow control and
        idle heartbeats (``NATS/1.0 100 ...``, on the delivery subject)."""
        status = headers[9:12]
        if parts[1] == b"1":
            if status == b"503":  # nobody answers the API: JetStream is not enabled there
                payload = b'{"error":{"code":503,"description":"no responders"}}'
            self._reply(parts[0], payload)
            return None
        if parts[1] != self._deliver_sid_bytes or status != b"100":
            return None
        self._active = True
        if len(parts) == 5 and b"FlowControl" in headers[:40]:
            # Everything before it has been handed on: let the server send more.
            return self._send(b"PUB " + parts[2] + b" 0\r\n\r\n")
        # An idle heartbeat: it names the last delivery sent, and a flow control request
        # that was missed (the consumer is stalled until it is answered).
        fields = dict(line.split(b":", 1) for line in headers.split(b"\r\n")[1:] if b":" in line)
        last = fields.get(b"Nats-Last-Consumer")
        if last is not None and int(last) != self._last_consumer_seq:
            self.restart("next")
        stalled = fields.get(b"Nats-Consumer-Stalled")
        if stalled is not None:
            return self._send(b"PUB " + stalled.strip() + b" 0\r\n\r\n")
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
                await self._create_consumer()

    async def _create_consumer(self) -> None:
        settings = self._settings
        previous = self._consumer
        # The stream first: if it was recreated while we were away (by another Odin, an
        # operator, a server that lost its memory storage), reading on from our last
        # position would mix two histories under one epoch.
        info = orjson.loads(await self.request(f"$JS.API.STREAM.INFO.{settings.stream}", b""))
        if "error" in info:
            raise ConnectionLost(f"stream: {info['error'].get('description', info['error'])}")
        if self._on_stream(info):
            self._policy = "all"
            self.last_stream_seq = 0
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
            "filter_subject": settings.filter_subject,
            "inactive_threshold": int(max(30.0, settings.heartbeat * 10) * 1e9),
        }
        if self._policy == "next" and self.last_stream_seq:
            config.update(
                deliver_policy="by_start_sequence", opt_start_seq=self.last_stream_seq + 1
            )
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
            )
        )
        if "error" in reply:
            raise ConnectionLost(f"consumer: {reply['error'].get('description', reply['error'])}")
        self._consumer = reply["name"]
        self.consumers_created += 1
        if previous:
            self._log.info("nats_consumer_recreated", start=config.get("opt_start_seq"))
            await self._send(
                f"PUB $JS.API.CONSUMER.DELETE.{settings.stream}.{previous} 0\r\n\r\n".encode()
            )

    async def request(self, subject: str, body: bytes) -> bytes:
        """A request-reply on this connection (JetStream API calls)."""
        self._request_number += 1
        token = f"{self._inbox}.r{self._request_number}"
        send, receive = trio.open_memory_channel[bytes](1)
        self._replies[token] = send
        try:
            await self._send(f"PUB {subject} {token} {len(body)}\r\n".encode() + body + b"\r\n")
            with trio.fail_after(self._settings.request_timeout):
                return await receive.receive()
        except trio.TooSlowError:
            raise ConnectionLost(f"no answer to {subject}") from None
        finally:
            del self._replies[token]

    def _reply(self, subject: bytes, payload: bytes) -> None:
        channel = self._replies.get(subject.decode())
        if channel is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                channel.send_nowait(payload)

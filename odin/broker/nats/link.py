"""A NATS connection in Trio that speaks the text protocol: the base of the hot paths.

nats-py runs on asyncio, and through trio-asyncio every message it handles costs several
asyncio callbacks (measured: a publisher at 1,000 events/s spent 85 % of a core in the
trio-asyncio loop). The two paths that carry one NATS message per event, reading the stream
(``delivery.py``) and publishing into it (``publish.py``), therefore use a connection of
their own, written here against the NATS client protocol (INFO, CONNECT, PUB/HPUB, SUB,
MSG/HMSG, PING/PONG; https://docs.nats.io/reference/reference-protocols/nats-protocol).

``Link`` connects (with the URL's user and password or token), subscribes an inbox for
replies (subscription 1), pings so a silent partition is noticed, and reconnects for ever
with backoff and jitter. A subclass parses what arrives in ``_parse`` (synchronously, the
per-message path) and starts its work in ``_connected``.
"""

from __future__ import annotations

import contextlib
import random
import secrets
from collections.abc import Awaitable

import attrs
import orjson
import trio

from odin.config import NatsAddress
from odin.logs import Log

READ_SIZE = 256 * 1024
YIELD_EVERY = 256
"""Operations parsed between checkpoints (a read can hold a couple of thousand)."""
_MAX_CONTROL_LINE = 64 * 1024


class ConnectionLost(Exception):
    """The connection failed or went silent."""


LOST = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ConnectionLost,
)

NO_RESPONDERS = b'{"error":{"code":503,"description":"no responders"}}'


@attrs.define
class LinkSettings:
    servers: list[NatsAddress]
    ping_interval: float
    max_outstanding_pings: int
    connect_timeout: float
    reconnect_wait_min: float
    reconnect_wait_max: float
    request_timeout: float = 5.0


class Link:
    """One NATS connection, kept up for ever. ``name`` is its client name and its log tag."""

    def __init__(self, settings: LinkSettings, log: Log, name: str) -> None:
        self._link_settings = settings
        self._name = name
        self._log = log.bind(connection=name)
        self.connected = False
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._token = secrets.token_hex(8)
        self._inbox = f"_INBOX.odin{self._token}"
        """Replies arrive under this prefix (subscription 1)."""
        self._replies: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._request_number = 0
        self._outstanding_pings = 0

    # ---- for subclasses ------------------------------------------------------------------

    def _parse(self, data: bytes, position: int) -> tuple[int, Awaitable[None] | None, bool]:
        """Handle the complete operations in ``data`` from ``position``, synchronously.
        Returns where it stopped; when it stopped for one, an awaitable to finish before going
        on; and whether it stopped short of a whole operation (read more). At most
        ``YIELD_EVERY`` operations per call."""
        raise NotImplementedError

    async def _connected(self, nursery: trio.Nursery) -> None:
        """Called on each new connection, before it counts as connected."""

    def _disconnected(self) -> None:
        """Called when a connection ends."""

    # ---- connection ----------------------------------------------------------------------

    async def run(self) -> None:
        settings = self._link_settings
        attempt = 0
        while True:
            server = settings.servers[attempt % len(settings.servers)]
            failures: list[BaseException] = []
            was_connected = False
            try:
                with trio.fail_after(settings.connect_timeout):
                    stream = await trio.open_tcp_stream(server.host, server.port)
                try:
                    await self._serve(stream, server)
                finally:
                    was_connected, self.connected = self.connected, False
                    self._stream = None
                    self._disconnected()
                    await trio.aclose_forcefully(stream)
            except* LOST as group:  # grouped: it may come from any task of the connection
                failures.extend(group.exceptions)
            if failures and (was_connected or attempt == 0):  # not every failed retry
                self._log.warning(
                    f"nats_{self._name}_lost", server=server.display, error=repr(failures[0])
                )
            attempt = 1 if was_connected else attempt + 1
            wait = min(
                settings.reconnect_wait_max, settings.reconnect_wait_min * 2 ** min(attempt, 16)
            )
            await trio.sleep(wait * random.uniform(0.5, 1.0))

    async def _serve(self, stream: trio.SocketStream, server: NatsAddress) -> None:
        self._stream = stream
        buffer = bytearray()
        with trio.fail_after(self._link_settings.connect_timeout):
            line = await self._read_line(stream, buffer)
            if not line.startswith(b"INFO "):
                raise ConnectionLost(f"unexpected greeting {line[:40]!r}")
            connect: dict[str, object] = {
                "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                "name": f"odin-{self._name}", "lang": "python", "version": "odin",
                "protocol": 1,
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
            await self._connected(nursery)
            self.connected = True

    async def _read_line(self, stream: trio.SocketStream, buffer: bytearray) -> bytes:
        while (end := buffer.find(b"\r\n")) < 0:
            data = await stream.receive_some(READ_SIZE)
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
        settings = self._link_settings
        while True:
            await trio.sleep(settings.ping_interval)
            if self._outstanding_pings >= settings.max_outstanding_pings:
                raise ConnectionLost("no PONG from the server")
            self._outstanding_pings += 1
            await self._send(b"PING\r\n")

    async def _read_loop(self, stream: trio.SocketStream, buffer: bytearray) -> None:
        data = bytes(buffer)
        position = 0
        while True:
            position, follow_up, short = self._parse(data, position)
            if follow_up is not None:
                await follow_up
                continue
            if not short:
                # A full batch: let the rest of the process run (receiving below is a
                # checkpoint too).
                await trio.lowlevel.checkpoint()
                continue
            if len(data) - position > _MAX_CONTROL_LINE and data.find(b"\r\n", position) < 0:
                raise ConnectionLost("control line too long")
            more = await stream.receive_some(READ_SIZE)
            if not more:
                raise ConnectionLost("closed by the server")
            data = data[position:] + more if position < len(data) else more
            position = 0

    def _control(self, line: bytes) -> Awaitable[None] | None:
        """A line that is not a message: PING, PONG, -ERR, +OK, INFO."""
        if line == b"PING":
            return self._send(b"PONG\r\n")
        if line == b"PONG":
            self._outstanding_pings = 0
        elif line.startswith(b"-ERR"):
            raise ConnectionLost(line.decode(errors="replace"))
        return None  # +OK and asynchronous INFO need nothing.

    # ---- requests ------------------------------------------------------------------------

    async def request(self, subject: str, body: bytes) -> bytes:
        """A request-reply on this connection (JetStream API calls)."""
        self._request_number += 1
        token = f"{self._inbox}.r{self._request_number}"
        send, receive = trio.open_memory_channel[bytes](1)
        self._replies[token] = send
        try:
            await self._send(f"PUB {subject} {token} {len(body)}\r\n".encode() + body + b"\r\n")
            with trio.fail_after(self._link_settings.request_timeout):
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

"""The WebSocket side of one connection: wsproto's frame-level ``Connection`` driven directly.

Bytes from the socket go into wsproto; its events come out as calls on a ``Handler``: whole
messages, and every ping or pong as proof the peer is alive. Pings are answered, the close
handshake is completed, and what wsproto cannot parse is closed with the code it names (1002,
1007, or 1009 from ``MessageSizeGuard`` on the header of an oversized frame) before the socket
is. Frames out go through the connection's ``Writer``. This is hypercorn's ``ws_stream`` shape:
one reading loop in the connection's own task, no task of its own for anything else.

The Odin protocol is not here: ``Connection`` is the handler for Odin's clients, the
conformance suite's echo server another.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import trio
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.events import Event as WsEvent

from odin_fanout.protocol.close_codes import CloseCode
from odin_fanout.server.handshake import MessageSizeGuard
from odin_fanout.server.writer import Writer

_READ_SIZE = 65536
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
PROTOCOL_ERROR_REASONS = {
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.INVALID_DATA: "invalid UTF-8 in a text message",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
}


class Handler(Protocol):
    async def on_message(self, message: str | bytes) -> None:
        """A whole text (str) or binary (bytes) message."""

    def on_activity(self, now: float) -> None:
        """A frame of any kind arrived: the peer is alive."""

    def on_protocol_error(self, code: CloseCode, detail: str) -> None:
        """What the peer sent cannot be parsed; the handler closes with ``code``."""


class WebSocket:
    def __init__(
        self,
        transport: trio.abc.Stream,
        writer: Writer,
        *,
        max_message_size: int,
        trailing: bytes = b"",
        scope: trio.CancelScope | None = None,
    ) -> None:
        """``scope``: a cancel scope already around the caller (the connection's nursery's),
        used for the close deadline instead of one of our own."""
        self.transport = transport
        self.writer = writer
        self._ws = FrameConnection(
            ConnectionType.SERVER, extensions=[MessageSizeGuard(max_message_size)]
        )
        self._pending = trailing
        """Bytes the client sent right behind its upgrade request."""
        self._own_scope = scope is None
        self._scope = trio.CancelScope() if scope is None else scope
        self._text: list[str] = []
        self._binary: list[bytes] = []
        """Fragments of the message being received (wsproto hands them over as they come)."""
        self.remote_close: tuple[int, str] | None = None
        """The code and reason of the peer's close frame, if it sent one."""
        self.closing = False
        """Our close frame is queued: messages that still arrive are not handled."""

    @property
    def open(self) -> bool:
        return self._ws.state is ConnectionState.OPEN

    def message_frame(self, message: str | bytes) -> bytes:
        """The frame for one message of our own (Odin's frames are pre-encoded instead)."""
        if isinstance(message, str):
            return self._ws.send(TextMessage(data=message))
        return self._ws.send(BytesMessage(data=message))

    def send(self, frame: bytes) -> None:
        """Queue a control frame or reply (never dropped by the queue's bound)."""
        self.writer.offer(frame, force=True)

    def close(self, code: int, reason: str, within: float) -> None:
        """Queue our close frame and give the peer ``within`` seconds to answer it."""
        if not self.closing and self.open:
            self.send(self._ws.send(CloseConnection(code, reason)))
        self.closing = True
        self.close_within(within)

    def close_within(self, seconds: float) -> None:
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + seconds)

    async def run(self, handler: Handler, close_timeout: float) -> None:
        """Read and handle frames until the connection is done, then send what is queued
        (our close frame, or the answer to theirs); all of it bounded once closing starts."""
        try:
            with self._scope if self._own_scope else contextlib.nullcontext():
                await self._read(handler)
                if not self.closing:
                    if self.remote_close is None:
                        self.remote_close = (1006, "connection lost")
                    self.close_within(close_timeout)
                await self.writer.wait_flushed()
        finally:
            self._release_parser()

    def _release_parser(self) -> None:
        """wsproto's frame parser is a generator that holds its own ``FrameProtocol``: a
        reference cycle, which only the cyclic collector frees, and the server's collector
        runs rarely (``odin_fanout.cli.GC_THRESHOLDS``), so every connection's parser outlived it.
        Closing the generator (nothing is parsed after ``run``) breaks the cycle, and the
        parser goes with the connection. ``getattr``: wsproto keeps both attributes private."""
        parser = getattr(getattr(self._ws, "_proto", None), "_parse_more", None)
        if parser is not None:
            parser.close()

    async def _read(self, handler: Handler) -> None:
        data: bytes | bytearray = self._pending
        self._pending = b""
        while True:
            if data:
                self._ws.receive_data(data if isinstance(data, bytes) else bytes(data))
                for event in self._ws.events():
                    if not await self._on_event(event, handler):
                        return
                self.writer.flush()
            try:
                data = await self._receive(drained=len(data) < _READ_SIZE)
            except _BROKEN:
                data = b""
            if not data:
                return

    async def _receive(self, *, drained: bool) -> bytes | bytearray:
        """The next bytes from the peer (empty at its end).

        On a socket, after a read that did not fill the buffer the kernel's queue is almost
        certainly empty: wait until it is readable before reading, instead of a ``recv`` that
        finds nothing first (as ``SocketStream.receive_some`` does). That saves a system call
        and a trip through trio's retry helper per wake-up, which is most of the cost of a pong
        from an idle client. ``transport.socket`` is the SocketStream's public socket.
        """
        transport = self.transport
        if not isinstance(transport, trio.SocketStream):
            return await transport.receive_some(_READ_SIZE)
        sock = transport.socket
        if drained:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()  # more is queued: read on, but let others run
        while True:
            try:
                return os.read(sock.fileno(), _READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)

    async def _on_event(self, event: WsEvent, handler: Handler) -> bool:
        """Handle one wsproto event; False when reading is over."""
        handler.on_activity(trio.current_time())
        if isinstance(event, TextMessage):
            self._text.append(event.data)
            if event.message_finished:
                text, self._text = "".join(self._text), []
                if not self.closing:
                    await handler.on_message(text)
            return True
        if isinstance(event, BytesMessage):
            self._binary.append(bytes(event.data))
            if event.message_finished:
                binary, self._binary = b"".join(self._binary), []
                if not self.closing:
                    await handler.on_message(binary)
            return True
        if isinstance(event, Ping):
            if self.open:
                self.send(self._ws.send(event.response()))
            return True
        if isinstance(event, Pong):
            return True
        assert isinstance(event, CloseConnection)
        if self.open:
            # wsproto could not parse what the peer sent (it reports that as a close the
            # peer did not send): close with its code, and stop reading the broken stream.
            handler.on_protocol_error(CloseCode(event.code), event.reason or "")
            return False
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self.remote_close = (event.code, event.reason or "")
            self.send(self._ws.send(event.response()))
        return False  # the peer's close, or its answer to ours: the handshake is done

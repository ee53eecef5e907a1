"""An echo server on Odin's own WebSocket layer, for the Autobahn|Testsuite conformance run.

Each connection goes through the same pieces as ``OdinServer._serve``: the request head is
read once with h11 (``read_request_head``), the upgrade is checked and answered by
``handshake.accept``, and ``WebSocket`` (wsproto's frame-level connection, the size guard, the
close handshake) runs the connection, writing through a ``Writer`` and its ``Outbox``. The
handler sends every text or binary message back. Whatever goes wrong with one connection is
caught and logged to stderr, so one bad client never ends the server.

Only the size limits differ from production: the conformance cases send messages of up to
16 MiB, so messages and the queue allow 64 MiB here. The production limit is tested elsewhere.

Run: ``python -m tests.conformance.echo_server --port 0``. It binds 127.0.0.1 only, prints one
JSON line ``{"event": "listening", "port": N}`` to stdout, and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from functools import partial

import trio

from odin_fanout.protocol.close_codes import CloseCode
from odin_fanout.server.app import peer_address
from odin_fanout.server.handshake import HandshakeRefused, accept
from odin_fanout.server.http import BadRequest, read_request_head, response
from odin_fanout.server.outbox import Outbox
from odin_fanout.server.websocket import PROTOCOL_ERROR_REASONS, WebSocket
from odin_fanout.server.writer import Flusher, Writer

HOST = "127.0.0.1"
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
QUEUE_MAX_BYTES = 2 * MAX_MESSAGE_SIZE
QUEUE_MAX_MESSAGES = 1024
MAX_REQUEST_HEAD = 16 * 1024
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0


def _log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


class Echo:
    """The handler: every message goes back as it came."""

    def __init__(self, socket: WebSocket) -> None:
        self.socket = socket

    async def on_message(self, message: str | bytes) -> None:
        self.socket.send(self.socket.message_frame(message))

    def on_activity(self, now: float) -> None:
        pass

    def on_protocol_error(self, code: CloseCode, detail: str) -> None:
        self.socket.close(code, PROTOCOL_ERROR_REASONS[code], CLOSE_TIMEOUT)


async def handle_connection(
    transport: trio.abc.Stream, flusher: Flusher, *, max_message_size: int
) -> None:
    """Serve one TCP connection; never raises."""
    peer = peer_address(transport)
    try:
        async with trio.open_nursery() as nursery:
            writer = Writer(transport, Outbox(QUEUE_MAX_MESSAGES, QUEUE_MAX_BYTES), flusher)
            writer.attach(nursery)
            try:
                await _serve(transport, writer, max_message_size=max_message_size)
            finally:
                writer.mark_closed()
                nursery.cancel_scope.cancel()
    except* Exception as group:
        _log("conn_error", peer=peer, error="".join(traceback.format_exception(group)))
    finally:
        await trio.aclose_forcefully(transport)


async def _answer(writer: Writer, data: bytes) -> None:
    writer.offer(data, force=True)
    await writer.wait_flushed()


async def _serve(transport: trio.abc.Stream, writer: Writer, *, max_message_size: int) -> None:
    with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
        try:
            head = await read_request_head(transport, MAX_REQUEST_HEAD)
        except BadRequest as exc:
            await _answer(writer, response(exc.status, f"{exc}\n".encode()))
            return
        if head is None:
            return
        if not head.is_websocket_upgrade:
            refusal = response(
                426, b"this endpoint speaks WebSocket\n", headers=[(b"Upgrade", b"websocket")]
            )
            await _answer(writer, refusal)
            return
        try:
            writer.offer(accept(head, None), force=True)
        except HandshakeRefused as exc:
            await _answer(writer, exc.answer)
            return
        trailing = head.trailing
    if handshake.cancelled_caught:
        return
    socket = WebSocket(transport, writer, max_message_size=max_message_size, trailing=trailing)
    writer.flush()
    await socket.run(Echo(socket), CLOSE_TIMEOUT)


async def serve(port: int, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
    """Listen on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listeners = await trio.open_tcp_listeners(port, host=HOST)
        try:
            async with trio.open_nursery() as nursery:
                flusher = Flusher()
                nursery.start_soon(flusher.run)
                handler = partial(
                    handle_connection, flusher=flusher, max_message_size=max_message_size
                )
                nursery.start_soon(
                    partial(trio.serve_listeners, handler, listeners, handler_nursery=nursery)
                )
                bound = listeners[0].socket.getsockname()[1]
                print(json.dumps({"event": "listening", "port": bound}), flush=True)
                async for signum in signals:
                    _log("stopping", signal=signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Echo server on Odin's WebSocket layer.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument(
        "--max-message-size", type=int, default=MAX_MESSAGE_SIZE, help="bytes per message"
    )
    args = parser.parse_args(argv)
    trio.run(partial(serve, args.port, max_message_size=args.max_message_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

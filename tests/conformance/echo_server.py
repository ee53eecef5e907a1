"""An echo server on Odin's own WebSocket layer, for the Autobahn|Testsuite conformance run.

Each connection goes through the same pieces as ``OdinServer._handle``/``_serve``: the request
head is read with h11 through a ``ConnectionWriter`` (``read_request_head``), handed back with
``replay_on_receive``, and the handshake and frames are done by ``wrap_server_stream`` (the
``OdinWebSocket`` class), which writes through the writer. Every text or binary message is sent
back with ``send_message``. Whatever goes wrong with one connection is caught and logged to
stderr, so one bad client never ends the server (the crash found in the ecosystem research,
section A.2, came from a ``ConnectionClosed`` escaping ``send_message``).

Only the size limits differ from production: the conformance cases send messages of up to
16 MiB, so messages and the writer's queue allow 64 MiB here. The production limit is tested
elsewhere.

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
from trio_websocket import ConnectionClosed

from odin.server.app import peer_address
from odin.server.http import BadRequest, read_request_head, response
from odin.server.websocket import wrap_server_stream
from odin.server.writer import ConnectionWriter

HOST = "127.0.0.1"
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# The writer breaks a connection whose queue passes 2 * max_bytes + 64 KiB, and a frame is
# queued whole: the queue must hold the largest echoed frame.
WRITER_MAX_BYTES = MAX_MESSAGE_SIZE
WRITER_MAX_MESSAGES = 1024
MESSAGE_QUEUE_SIZE = 16  # as odin.server.app
MAX_REQUEST_HEAD = 16 * 1024
HANDSHAKE_TIMEOUT = 10.0

# Ways a connection normally ends; anything else is logged with its traceback.
_EXPECTED_ERRORS = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


def _log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


async def handle_connection(transport: trio.abc.Stream, *, max_message_size: int) -> None:
    """Serve one TCP connection; never raises (trio.serve_listeners closes ``transport``)."""
    peer = peer_address(transport)
    try:
        async with trio.open_nursery() as nursery:
            writer = ConnectionWriter(
                transport, max_messages=WRITER_MAX_MESSAGES, max_bytes=WRITER_MAX_BYTES
            )
            nursery.start_soon(writer.run)
            try:
                await _serve(writer, nursery, max_message_size=max_message_size)
            finally:
                writer.mark_closed()
                nursery.cancel_scope.cancel()
    except* _EXPECTED_ERRORS:
        pass
    except* Exception as group:
        _log("conn_error", peer=peer, error="".join(traceback.format_exception(group)))


async def _serve(writer: ConnectionWriter, nursery: trio.Nursery, *, max_message_size: int) -> None:
    with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
        try:
            head = await read_request_head(writer, MAX_REQUEST_HEAD)
        except BadRequest as exc:
            await writer.send_all(response(exc.status, f"{exc}\n".encode()))
            return
        if head is None:
            return
        if not head.is_websocket_upgrade:
            await writer.send_all(
                response(
                    426,
                    b"this endpoint speaks WebSocket\n",
                    headers=[(b"Upgrade", b"websocket")],
                )
            )
            return
        writer.replay_on_receive(head.raw)
        request = await wrap_server_stream(
            nursery,
            writer,
            message_queue_size=MESSAGE_QUEUE_SIZE,
            max_message_size=max_message_size,
        )
        websocket = await request.accept()
    if handshake.cancelled_caught:
        return
    while True:
        try:
            message = await websocket.get_message()
            await websocket.send_message(message)
        except ConnectionClosed:
            return


async def serve(port: int, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
    """Listen on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listeners = await trio.open_tcp_listeners(port, host=HOST)
        try:
            async with trio.open_nursery() as nursery:
                handler = partial(handle_connection, max_message_size=max_message_size)
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

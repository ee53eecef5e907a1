"""The baseline: trio-websocket ``serve_websocket``, one ``send_message`` per connection.

This is the design Odin replaced: the server keeps a set of subscribed connections and, for
each message, loops ``await ws.send_message(text)`` over them, so wsproto encodes the frame
again for every connection and each send takes the connection's lock and checkpoints. The
publisher and the broadcast loop are one task, so when the loop cannot keep up the publisher
falls behind its schedule (reported as ``publish_late_max_ms``).
"""

from __future__ import annotations

import sys
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from odin_fanout.stress.peers.common import (
    ACK,
    Schedule,
    emit,
    parse_args,
    planned,
    read_command,
)


class Broadcaster:
    def __init__(self) -> None:
        self.connections: set[WebSocketConnection] = set()
        self.errors = 0

    async def handle(self, request: WebSocketRequest) -> None:
        # An exception escaping a handler would end serve_websocket, and the whole server.
        try:
            ws = await request.accept()
        except Exception:
            self.errors += 1
            return
        try:
            while True:
                await ws.get_message()  # the subscribe (and anything else): answer, subscribe
                self.connections.add(ws)
                await ws.send_message(ACK)
        except ConnectionClosed:
            pass
        except Exception as exc:
            self.errors += 1
            print(f"handler error: {exc!r}", file=sys.stderr)
        finally:
            self.connections.discard(ws)

    async def broadcast(self, text: str) -> None:
        for ws in list(self.connections):
            try:
                await ws.send_message(text)
            except ConnectionClosed:
                self.connections.discard(ws)

    async def publish(self, rate: float, total: int, size: int) -> None:
        schedule = Schedule(trio.current_time(), rate, total)
        sent = 0
        while sent < total:
            target = schedule.due(trio.current_time())
            while sent < target:
                payload = schedule.payload(sent, trio.current_time(), size)
                await self.broadcast(payload.decode())
                sent += 1
            await trio.sleep_until(schedule.next_time(sent))
        schedule.finished(sent, trio.current_time())


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    broadcaster = Broadcaster()
    with trio.move_on_after(args.max_seconds):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, broadcaster.handle, args.host, args.port, None)
            )
            emit("listening", port=server.port, server="triows")
            while True:
                command = await trio.to_thread.run_sync(read_command, abandon_on_cancel=True)
                if command == "start":
                    rate, total = planned(args)
                    await broadcaster.publish(rate, total, args.payload_size)
                elif command in ("", "stop"):
                    break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)

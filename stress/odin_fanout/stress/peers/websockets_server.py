"""The asyncio reference: websockets' asyncio server and ``websockets.broadcast()``.

``broadcast`` encodes the frame once and writes it to every connection's transport without
awaiting (connections whose buffer is full are skipped, which the load client would see as
missing messages). The standard asyncio event loop is used, no compression, no pings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import websockets
from websockets.asyncio.server import ServerConnection, serve

from odin_fanout.stress.peers.common import (
    ACK,
    Schedule,
    emit,
    parse_args,
    planned,
    stdin_commands,
)


class Broadcaster:
    def __init__(self) -> None:
        self.connections: set[ServerConnection] = set()

    async def handle(self, ws: ServerConnection) -> None:
        try:
            async for _ in ws:  # the subscribe (and anything else): answer, subscribe
                self.connections.add(ws)
                await ws.send(ACK)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.connections.discard(ws)

    async def publish(self, rate: float, total: int, size: int) -> None:
        loop = asyncio.get_running_loop()
        schedule = Schedule(loop.time(), rate, total)
        sent = 0
        while sent < total:
            target = schedule.due(loop.time())
            while sent < target:
                payload = schedule.payload(sent, loop.time(), size)
                websockets.broadcast(self.connections, payload.decode())
                sent += 1
            await asyncio.sleep(max(0.0, schedule.next_time(sent) - loop.time()))
        schedule.finished(sent, loop.time())


async def serve_until_told(args: argparse.Namespace, broadcaster: Broadcaster) -> None:
    commands = stdin_commands(asyncio.get_running_loop())
    async with serve(
        broadcaster.handle,
        args.host,
        args.port,
        compression=None,
        ping_interval=None,
        backlog=4096,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        emit("listening", port=port, server="websockets", version=websockets.version.version)
        while True:
            command = await commands.get()
            if command == "start":
                rate, total = planned(args)
                await broadcaster.publish(rate, total, args.payload_size)
            elif command in ("", "stop"):
                break


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.max_seconds):
            await serve_until_told(args, Broadcaster())


if __name__ == "__main__":
    asyncio.run(main())

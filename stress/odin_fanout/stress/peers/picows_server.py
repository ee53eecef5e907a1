"""The picows peer: picows' asyncio server, ``transport.send`` of the payload per subscriber.

picows (Cython) parses and builds frames in C; the broadcast loops over the subscribed
connections and calls ``WSTransport.send(WSMsgType.TEXT, payload)`` on each, which frames the
payload again for every connection and writes it to the transport without awaiting (as
stack-findings.md section 3 measured it). picows' defaults otherwise: aiofastnet transports
when aiofastnet is installed (picows depends on it), automatic pongs, no pings, no
compression (picows has none). The standard asyncio event loop is used, as for the
websockets peer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import logging

import picows
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest

from odin_fanout.stress.peers.common import (
    ACK,
    Schedule,
    emit,
    parse_args,
    planned,
    stdin_commands,
)

ACK_BYTES = ACK.encode()


class Broadcaster:
    def __init__(self) -> None:
        self.connections: set[WSTransport] = set()

    def broadcast(self, payload: bytes) -> None:
        for transport in tuple(self.connections):  # a failing send may drop a connection
            transport.send(WSMsgType.TEXT, payload)

    async def publish(self, rate: float, total: int, size: int) -> None:
        loop = asyncio.get_running_loop()
        schedule = Schedule(loop.time(), rate, total)
        sent = 0
        while sent < total:
            target = schedule.due(loop.time())
            while sent < target:
                self.broadcast(schedule.payload(sent, loop.time(), size))
                sent += 1
            await asyncio.sleep(max(0.0, schedule.next_time(sent) - loop.time()))
        schedule.finished(sent, loop.time())


class Subscriber(WSListener):
    """One connection: any data frame (the subscribe) is answered and subscribes it."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        super().__init__()
        self.broadcaster = broadcaster

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.broadcaster.connections.add(transport)
            transport.send(WSMsgType.TEXT, ACK_BYTES)
        elif frame.msg_type == WSMsgType.CLOSE:
            self.broadcaster.connections.discard(transport)
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.broadcaster.connections.discard(transport)


async def serve_until_told(args: argparse.Namespace, broadcaster: Broadcaster) -> None:
    commands = stdin_commands(asyncio.get_running_loop())

    def listener(_request: WSUpgradeRequest) -> Subscriber:
        return Subscriber(broadcaster)

    server = await picows.ws_create_server(
        listener, args.host, args.port, websocket_handshake_timeout=30, backlog=4096
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        emit(
            "listening",
            port=port,
            server="picows",
            version=importlib.metadata.version("picows"),
            aiofastnet=importlib.util.find_spec("aiofastnet") is not None,
        )
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

"""A plain NATS publisher of the benchmark payload, for a benchmark whose server reads NATS.

``odin serve`` with several workers cannot take the in-process publisher of
``peers/odin_server.py``: every worker consumes the JetStream stream itself, so the benchmark
payload must go through NATS. This process connects to ``--url`` with nats-py (asyncio, no
JetStream API: a core ``PUB``, which the stream captures, as any publisher of Odin's does) and
publishes on ``--subject`` (``odin.token.BENCH.trade``, the subject of the channel
``BENCH.trade`` every load client subscribes to) with the pacing and the payload of the other
peers (``odin_fanout.stress.peers.common``: ``seq``, ``ts``, ``ns``, ``due``; a rate, or ``--burst
B``), through ``nats_ws_server.publish``.

Driver protocol (JSON lines on stdout, commands on stdin): ``{"event": "connected"}`` once
connected; ``warmup`` publishes one payload with ``seq`` -1 and answers ``warmed`` once NATS
has it (the driver uses it to see that every worker's consumer reads the stream before it
measures); ``start`` publishes the run (``publishing``, then ``done``); ``stop`` or the end of
input exits. The process exits by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

import nats
from nats.aio.client import Client

from odin_fanout.stress.peers.common import (
    emit,
    make_payload,
    parse_args,
    planned,
    stdin_commands,
)
from odin_fanout.stress.peers.nats_ws_server import publish

SUBJECT = "odin.token.BENCH.trade"
"""Odin's NATS subject for the channel ``BENCH.trade``
(odin_fanout.protocol.channels.subject_for)."""


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the NATS server, nats://127.0.0.1:PORT")
    parser.add_argument("--subject", default=SUBJECT)


async def serve_until_told(args: argparse.Namespace) -> None:
    nc: Client = await nats.connect(
        args.url, allow_reconnect=False, connect_timeout=5, pending_size=64 * 1024 * 1024
    )
    commands = stdin_commands(asyncio.get_running_loop())
    try:
        emit("connected", pid=os.getpid(), subject=args.subject)
        while True:
            command = await commands.get()
            if command == "warmup":
                await nc.publish(args.subject, make_payload(-1, args.payload_size))
                await nc.flush(timeout=10)
                emit("warmed")
            elif command == "start":
                rate, total = planned(args)
                await publish(nc, rate, total, args.payload_size, args.subject)
            elif command in ("", "stop"):
                break
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


async def main_async(args: argparse.Namespace) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.max_seconds):
            await serve_until_told(args)


def main() -> None:
    asyncio.run(main_async(parse_args(__doc__.splitlines()[0], extra_args)))


if __name__ == "__main__":
    main()

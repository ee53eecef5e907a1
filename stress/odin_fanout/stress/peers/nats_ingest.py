"""Ingest peers for ``odin_fanout.stress.bench_ingest``: nats-py's ordered push consumer, the way a
bridge would use it without Odin's own delivery reader.

- ``--mode asyncio``: plain asyncio, a callback that only counts. nats-py's ceiling here.
- ``--mode trio-asyncio``: the pattern the NATS bridge started from. nats-py runs on a
  trio-asyncio loop; its callback reads the message's metadata and hands a ``Publication``
  to a bounded Trio channel with ``send_nowait``; a Trio task drains it (no fan-out).

Both create the stream as Odin would (``ODIN_TOKENS``, memory storage), print
``{"ready": true}`` once subscribed, then ``{"ingested": N, "pending": P, "dropped": D}``
every 0.1 s on stdout, and exit on SIGTERM or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from odin_fanout.protocol.channels import channel_from_subject
from odin_fanout.protocol.publication import Publication


class Counts:
    def __init__(self) -> None:
        self.ingested = 0
        self.pending = 0
        self.dropped = 0

    def report(self) -> None:
        line = {"ingested": self.ingested, "pending": self.pending, "dropped": self.dropped}
        print(json.dumps(line), flush=True)


async def _subscribe(url: str, callback: Any) -> Any:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="ODIN_TOKENS",
            subjects=["odin.token.>"],
            storage=StorageType.MEMORY,
            allow_direct=True,
            max_msgs_per_subject=10_000,
        )
    )
    await js.subscribe(
        "odin.token.>",
        stream="ODIN_TOKENS",
        cb=callback,
        ordered_consumer=True,
        idle_heartbeat=5.0,
        deliver_policy=DeliverPolicy.NEW,
        pending_msgs_limit=200_000,
    )
    return nc


async def _report_forever(counts: Counts, max_seconds: float) -> None:
    deadline = time.monotonic() + max_seconds
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() < deadline:
        counts.report()
        await asyncio.sleep(0.1)


def run_asyncio(url: str, max_seconds: float) -> None:
    counts = Counts()

    async def on_message(msg: Msg) -> None:
        counts.ingested += 1
        counts.pending = msg.metadata.num_pending

    async def main() -> None:
        nc = await _subscribe(url, on_message)
        try:
            await _report_forever(counts, max_seconds)
        finally:
            await nc.close()

    asyncio.run(main())


def run_trio_asyncio(url: str, max_seconds: float) -> None:
    import trio
    import trio_asyncio

    counts = Counts()

    async def main() -> None:
        send, receive = trio.open_memory_channel[Publication](100_000)

        async def on_message(msg: Msg) -> None:
            metadata = msg.metadata
            counts.pending = metadata.num_pending
            channel = channel_from_subject(msg.subject) or ""
            seq = metadata.sequence.stream
            publication = Publication(
                channel, seq, seq - 1, "e", metadata.timestamp.timestamp(), msg.data
            )
            try:
                send.send_nowait(publication)
            except trio.WouldBlock:
                counts.dropped += 1

        async def drain() -> None:
            async for _ in receive:
                counts.ingested += 1

        async def report() -> None:
            await trio_asyncio.aio_as_trio(_report_forever)(counts, max_seconds)

        async with trio_asyncio.open_loop():
            nc = await trio_asyncio.aio_as_trio(_subscribe)(url, on_message)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await report()
                nursery.cancel_scope.cancel()
            await trio_asyncio.aio_as_trio(nc.close)()

    trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=("asyncio", "trio-asyncio"), required=True)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.mode == "asyncio":
        run_asyncio(args.url, args.max_seconds)
    else:
        run_trio_asyncio(args.url, args.max_seconds)


if __name__ == "__main__":
    main()

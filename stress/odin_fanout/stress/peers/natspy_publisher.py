"""Publisher peer for ``odin_fanout.stress.bench_publisher``: the same simulated events, paced the
same way (event ``n`` due at ``start + n / rate``, woken at most every millisecond), published with
nats-py on plain asyncio: ``publish_async`` with a ``Nats-Msg-Id``, acknowledgements awaited
by nats-py. What a straightforward asyncio publisher costs, beside Odin's.

    python -m odin_fanout.stress.peers.natspy_publisher nats://127.0.0.1:4222 1000 10
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import nats
import orjson
from nats.js.api import StorageType, StreamConfig

from odin_fanout.simulator.model import Market


async def main(url: str, rate: float, duration: float) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=10_000)
    await js.add_stream(
        StreamConfig(
            name="ODIN_TOKENS", subjects=["odin.token.>"], storage=StorageType.MEMORY,
            allow_direct=True,
        )
    )  # fmt: skip
    market = Market(rng=random.Random(1), clock=time.time)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = round(rate * duration)
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - start) * rate + 1e-6) + 1)
        while sent < due:
            channel, payload = market.next_event()
            sent += 1
            await js.publish_async(
                f"odin.token.{channel}", orjson.dumps(payload),
                headers={"Nats-Msg-Id": f"peer-{sent}"},
            )  # fmt: skip
        now = loop.time()
        next_due = start + sent / rate
        await asyncio.sleep(max(0.0, next_due - now, 0.001 if next_due > now else 0.0))
    await asyncio.wait_for(js.publish_async_completed(), timeout=30)
    print(json.dumps({"sent": sent, "seconds": loop.time() - start}), flush=True)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))

"""How long the control socket's answers hold the server's event loop, with N open
connections.

Usage: ``.venv/bin/python -m odin_fanout.stress.bench_control [--connections 1000,10000,20000]``

The answers (``odin_fanout.server.control_state``) run over synthetic connection objects that have
what they read (a queue, subscriptions, counters), in a Trio loop beside a task that measures
how long each of its checkpoints waited: the longest wait is what the fan-out would have
waited. Figures in docs/operations/control.md.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.config import Config
from odin_fanout.control.protocol import ListConnections
from odin_fanout.logs import get_logger
from odin_fanout.metrics import Metrics
from odin_fanout.server import control_state
from odin_fanout.server.context import ServerContext


class _Writer:
    def __init__(self, queued: int) -> None:
        self.queued_messages = queued
        self.queued_bytes = queued * 220
        self._at = 1.0 if queued else None

    def oldest_queued_at(self) -> float | None:
        return self._at


class _Session:
    def __init__(self, channels: list[str]) -> None:
        self.subscriptions = set(channels)


class _Connection:
    """The attributes of odin_fanout.server.connection.Connection that control_state reads."""

    def __init__(self, number: int, rng: random.Random) -> None:
        self.id = f"bench-{number}"
        self.peer = f"10.0.{number % 250}.{number % 200}:{40000 + number % 20000}"
        self.writer = _Writer(rng.choice([0, 0, 0, 1, 5, 40]))
        event = rng.choice(["trade", "liquidity"])
        self.session = _Session(["BTC.trade", f"ETH.{event}"])
        self.delivered = number
        self.dropped = 0
        self.opened_at = 0.0
        self.rate_limited = 0
        self.closing = None
        self.origin = None
        self.recovering: dict[str, Any] = {}


async def _measure(answer: Callable[[], Awaitable[object]], repeats: int = 10) -> str:
    waits: list[float] = []

    async def watch() -> None:
        while True:
            started = time.perf_counter()
            await trio.lowlevel.checkpoint()
            waits.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        started = time.perf_counter()
        for _ in range(repeats):
            await answer()
        total = (time.perf_counter() - started) / repeats
        nursery.cancel_scope.cancel()
    return f"held {max(waits) * 1000:.1f} ms (all {total * 1000:.1f} ms)"


async def _run(count: int) -> None:
    context = ServerContext(
        config=Config(), broker=MemoryBroker(), metrics=Metrics(), log=get_logger()
    )
    rng = random.Random(count)
    for number in range(count):
        connection = _Connection(number, rng)
        context.registry.connections[connection.id] = connection  # type: ignore[assignment]
    rates = control_state.Rates(lambda: (0, 0))
    by_queue = ListConnections(0, 200, "queue")
    filtered = ListConnections(0, 200, "age", True, "ETH.liq")
    figures = {
        "snapshot": await _measure(lambda: control_state.snapshot(context, rates)),
        "page by queue": await _measure(lambda: control_state.list_connections(context, by_queue)),
        "page filtered": await _measure(lambda: control_state.list_connections(context, filtered)),
        "top 10 slow": await _measure(lambda: control_state.slow_consumers(context, 10)),
    }
    print(f"{count:>6} connections: " + "; ".join(f"{k} {v}" for k, v in figures.items()))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m odin_fanout.stress.bench_control")
    parser.add_argument("--connections", default="1000,10000,20000")
    args = parser.parse_args()
    for count in (int(n) for n in args.connections.split(",")):
        trio.run(_run, count)


if __name__ == "__main__":
    main()

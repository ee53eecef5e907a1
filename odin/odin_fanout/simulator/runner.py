"""Publish the simulated market at a steady rate.

The total rate is paced evenly: event ``n`` is due at ``start + n / rate``, so there are no
lock-step bursts across tokens and no drift (above 1000/s, to the nearest ``tick``). When the
loop falls behind (a slow broker, a busy core) it publishes what is due at once, at most
``max_burst`` per wake-up, and counts what it could not keep up with instead of building a
backlog.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import attrs
import orjson
import trio

from odin_fanout.broker.base import BrokerError
from odin_fanout.logs import Log
from odin_fanout.simulator.model import Market

Publish = Callable[[str, bytes], Awaitable[None]]


@attrs.define
class SimulatorStats:
    published: int = 0
    failed: int = 0
    skipped: int = 0
    """Events dropped because the loop fell more than one burst behind."""


async def run_simulator(
    publish: Publish,
    market: Market,
    rate: float,
    *,
    log: Log,
    stats: SimulatorStats | None = None,
    max_burst: int = 1000,
    tick: float = 0.001,
    task_status: trio.TaskStatus[SimulatorStats] = trio.TASK_STATUS_IGNORED,
) -> None:
    stats = stats or SimulatorStats()
    log.info(
        "simulator_started",
        rate=rate,
        tokens=[t.symbol for t in market.tokens],
        events=market.events,
    )
    task_status.started(stats)
    start = trio.current_time()
    due_count = 0
    last_failure_log = -1e9
    while True:
        now = trio.current_time()
        # The epsilon: woken exactly when event n is due, (now - start) * rate can come out a
        # hair under n (0.29 * 100 == 28.999999999999996), and the loop would spin.
        due = int((now - start) * rate + 1e-6) + 1
        if due - due_count > max_burst:
            stats.skipped += due - due_count - max_burst
            due_count = due - max_burst
        while due_count < due:
            due_count += 1
            channel, payload = market.next_event()
            try:
                await publish(channel, orjson.dumps(payload))
                stats.published += 1
            except BrokerError as exc:
                stats.failed += 1
                if now - last_failure_log >= 5.0:
                    last_failure_log = now
                    log.warning("simulator_publish_failed", error=str(exc), failed=stats.failed)
        next_due = start + due_count / rate
        now = trio.current_time()
        if next_due <= now:  # behind: on at once
            await trio.lowlevel.checkpoint()
        else:
            # Wake for the next event, but not more often than every ``tick``: above 1000/s
            # the events due within a tick go out together. (A wake-up costs 50-500 µs of
            # CPU on a virtual machine, far more than an event.)
            await trio.sleep_until(max(next_due, now + tick))


def wall_clock() -> float:
    return time.time()

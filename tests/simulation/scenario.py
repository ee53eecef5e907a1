"""One seeded scenario: a real ``OdinServer`` on the simulation broker, hundreds of virtual
clients over bounded in-memory pipes, in virtual time.

``plan(seed)`` draws everything a scenario decides from ``random.Random(seed)`` before anything
runs: the server's limits and slow-consumer policy, the broker's history and feed sizes, every
client's profile (subscriptions, pace, sessions), and the publisher's own generator. Nothing
decides from the wall clock or from the order tasks happen to run in; what the clients *see*
may differ with Trio's scheduling (which this suite does not control), and every invariant
holds whatever the interleaving, so a failing seed fails again when rerun.

``run(plan)`` starts the server (``OdinServer.run`` with the pipe listener), the clients and the
publisher, lets the publisher go for the scenario's duration, then drains the server
(``request_shutdown``) and checks that nothing is left. It returns a ``Report``: the
violations found (the checkers', the server's logged errors, the queue bounds, leftovers)
and what was simulated.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
import weakref
from functools import partial
from typing import Any

import attrs
import orjson
import trio
import trio.testing

from odin_fanout.config import Config
from odin_fanout.protocol.channels import matches
from odin_fanout.server.app import OdinServer
from odin_fanout.server.connection import Connection
from tests.helpers import make_config
from tests.simulation.broker import SimBroker
from tests.simulation.checker import ClientChecker, Counts
from tests.simulation.client import Profile, SessionPlan, World, run_client
from tests.simulation.pipe import PipeListener

TRACE = set(filter(None, os.environ.get("ODIN_SIM_TRACE", "").split(",")))
"""Clients whose every message is printed (``ODIN_SIM_TRACE=client-3,client-9-slow``)."""

SYMBOLS = ("BTC", "ETH", "SOL", "DOGE", "ADA", "XRP")
EVENTS = ("trade", "liquidity", "social")
CHANNELS = tuple(f"{symbol}.{event}" for symbol in SYMBOLS for event in EVENTS)
PATTERNS = (*(f"{symbol}.*" for symbol in SYMBOLS), *(f"*.{event}" for event in EVENTS))


@attrs.frozen
class Plan:
    seed: int
    policy: str
    clients: int
    duration: float
    queue_messages: int
    queue_bytes: int
    window: int
    recovery_max: int
    broker_history: int
    feed_capacity: int
    read_latency: float
    read_timeout: float
    pipe_bytes: int
    epochs: int
    dark_rate: float
    invalid_rate: float
    flood_rate: float
    max_burst: int
    feed_lag: float
    """Virtual seconds a burst waits in the history before the feed brings it."""
    profiles: tuple[Profile, ...]

    def describe(self) -> str:
        fields = attrs.asdict(self, filter=lambda attribute, _: attribute.name != "profiles")
        slow = sum(profile.slow for profile in self.profiles)
        return f"{fields} slow_clients={slow}"


def plan(
    seed: int,
    *,
    policy: str | None = None,
    clients: int | None = None,
) -> Plan:
    rng = random.Random(seed)
    chosen_policy = policy or rng.choice(("close", "conflate"))
    count = clients or rng.randint(100, 250)
    duration = rng.uniform(10.0, 20.0)
    queue_messages = rng.choice((128, 192, 256))
    feed_capacity = rng.choice((48, 64, 10_000, 10_000))
    profiles = tuple(_profile(rng, index, duration) for index in range(count))
    return Plan(
        seed=seed,
        policy=chosen_policy,
        clients=count,
        duration=duration,
        queue_messages=queue_messages,
        queue_bytes=64 * 1024,
        window=rng.choice((8, 32, 200)),
        recovery_max=rng.choice((50, 200, 1000)),
        broker_history=rng.choice((100, 400, 5000)),
        feed_capacity=feed_capacity,
        read_latency=rng.choice((0.0, 0.05, 0.5, 8.0)),
        read_timeout=5.0,
        pipe_bytes=rng.choice((2048, 8192)),
        epochs=rng.choice((0, 0, 1, 2)),
        dark_rate=rng.choice((0.0, 0.03, 0.1)),
        invalid_rate=rng.choice((0.0, 0.01)),
        flood_rate=rng.choice((0.0, 0.02)) if feed_capacity < 100 else 0.0,
        max_burst=min(queue_messages // 4, 30),
        feed_lag=rng.choice((0.0, 0.005, 0.02)),
        profiles=profiles,
    )


def _profile(rng: random.Random, index: int, duration: float) -> Profile:
    slow = rng.random() < 0.2
    count = rng.choice((1, 1, 2, 3))
    keys: list[str] = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.03:
            key = "*.*"
        elif draw < (0.45 if slow else 0.25):
            key = rng.choice(PATTERNS)
        else:
            key = rng.choice(CHANNELS)
        if key not in keys:
            keys.append(key)
    sessions = []
    for number in range(rng.choice((1, 2, 3, 4))):
        wait = rng.uniform(0, duration * 0.6) if number == 0 else rng.uniform(0.0, 5.0)
        more = None
        if rng.random() < 0.15:
            extra = rng.choice((*CHANNELS, *PATTERNS))
            more = (rng.uniform(0.0, 5.0), (extra,))
        sessions.append(
            SessionPlan(
                wait=wait,
                length=rng.uniform(1.0, duration * 0.7),
                drop=rng.random() < 0.3,
                more=more,
            )
        )
    stalls: list[tuple[float, float]] = []
    if slow and rng.random() < 0.5:
        start = rng.uniform(0, duration)
        stalls.append((start, start + rng.uniform(2.0, 15.0)))
    return Profile(
        name=f"client-{index}{'-slow' if slow else ''}",
        slow=slow,
        chunk=rng.choice((128, 256, 512)) if slow else 65536,
        delay=rng.uniform(0.02, 0.3) if slow else 0.0,
        stalls=tuple(stalls),
        keys=tuple(keys),
        sessions=tuple(sessions),
    )


def config_for(plan: Plan) -> Config:
    return make_config(
        **{
            "server.max_connections": 100_000,
            "server.close_timeout": 120.0,
            "shutdown.drain_timeout": 300.0,
            "connection.queue_max_messages": plan.queue_messages,
            "connection.queue_max_bytes": plan.queue_bytes,
            "connection.slow_consumer_policy": plan.policy,
            "connection.idle_timeout": 60.0,
            "history.max_messages": plan.window,
            "history.recovery_max_messages": plan.recovery_max,
            "history.read_timeout": plan.read_timeout,
            "broker.feed_capacity": plan.feed_capacity,
        }
    )


@attrs.define
class Report:
    seed: int
    violations: list[str] = attrs.Factory(list)
    client_seconds: float = 0.0
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0
    sessions: int = 0
    refused: int = 0
    published: int = 0
    dark: int = 0
    epochs: int = 0
    counts: Counts = attrs.Factory(Counts)
    max_queued: int = 0
    connections_seen: int = 0

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {self.sessions} sessions, {self.client_seconds / 3600:.2f} "
            f"client-hours in {self.virtual_seconds:.0f} virtual s / {self.wall_seconds:.2f} "
            f"wall s; {self.published} published ({self.dark} dark, {self.epochs} epochs), "
            f"{self.counts.events} events read, notices {self.counts.notices}, exact "
            f"recoveries {self.counts.exact} ({self.counts.replayed} replayed), resets "
            f"{self.counts.reset}, slow closes {self.counts.slow_closed}, max queue "
            f"{self.max_queued}"
        )


class _Errors(logging.Handler):
    """The server's errors (a connection's unexpected failure is logged, not raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "odin_fields", {})
        self.records.append(f"server logged {record.levelname} {record.getMessage()} {fields}")


async def _publish(plan: Plan, broker: SimBroker, rng: random.Random, server: OdinServer) -> None:
    """The publisher: bursts on weighted channels, dark publications, bodies that are not
    JSON, floods past the feed's capacity, and epoch changes, for ``plan.duration``."""
    weights = [rng.uniform(0.2, 3.0) for _ in CHANNELS]
    pads = {channel: (600 if channel.endswith(".social") else 40) for channel in CHANNELS}
    epochs = [rng.uniform(plan.duration * 0.2, plan.duration * 0.9) for _ in range(plan.epochs)]
    epochs.sort()
    start = trio.current_time()
    end = start + plan.duration
    number = 0
    budget = plan.queue_bytes // 3
    while trio.current_time() < end:
        broker.lag = plan.feed_lag > 0
        if epochs and trio.current_time() - start >= epochs[0]:
            epochs.pop(0)
            broker.flush_feed()
            broker.lose_history()
        draw = rng.random()
        if draw < plan.dark_rate:
            for _ in range(rng.randint(1, 4)):
                channel = rng.choices(CHANNELS, weights)[0]
                number += 1
                broker.publish_nowait(channel, _body(number, 10), feed=False)
        elif draw < plan.dark_rate + plan.invalid_rate:
            broker.publish_nowait(rng.choices(CHANNELS, weights)[0], b"{not json")
        elif draw < plan.dark_rate + plan.invalid_rate + plan.flood_rate:
            for _ in range(plan.feed_capacity + rng.randint(1, 40)):
                number += 1
                broker.publish_nowait(rng.choices(CHANNELS, weights)[0], _body(number, 0))
        else:
            spent = 0
            for _ in range(rng.randint(1, plan.max_burst)):
                channel = rng.choices(CHANNELS, weights)[0]
                number += 1
                body = _body(number, rng.randint(0, pads[channel]))
                spent += len(body) + 200
                if spent > budget:
                    break
                broker.publish_nowait(channel, body)
        pause = rng.choice((0.02, 0.05, 0.1, 0.2, 0.5))
        if plan.feed_lag:
            await trio.sleep(plan.feed_lag)
            broker.flush_feed()
        await trio.sleep(pause)
    broker.flush_feed()


def _body(number: int, pad: int) -> bytes:
    return orjson.dumps({"n": number, "pad": "x" * pad})


def _count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def run(plan: Plan) -> Report:
    report = Report(plan.seed)
    wall = time.perf_counter()
    rng = random.Random(plan.seed * 7919 + 1)
    broker = SimBroker(
        max_messages=plan.broker_history,
        feed_capacity=plan.feed_capacity,
        read_latency=plan.read_latency,
        latest_latency=plan.read_latency,
    )
    config = config_for(plan)
    errors = _Errors()
    logger = logging.getLogger("odin")
    logger.addHandler(errors)
    try:
        await trio.testing.wait_all_tasks_blocked()
        baseline = _count_tasks()
        server = OdinServer(config, broker)
        listener = PipeListener(to_client=plan.pipe_bytes)
        world = World(listener, trio.Event(), trio.current_time())
        checkers = [
            ClientChecker(
                profile.name,
                broker.truth,
                slow=profile.slow,
                policy=plan.policy,
            )
            for profile in plan.profiles
        ]
        for checker in checkers:
            checker.trace = checker.name in TRACE
        seen: dict[str, weakref.ref[Connection]] = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.run, listeners=[listener]))
            nursery.start_soon(_watch, plan, server, seen, report)
            async with trio.open_nursery() as clients:
                for profile, checker in zip(plan.profiles, checkers, strict=True):
                    clients.start_soon(run_client, profile, checker, world)
                await _publish(plan, broker, rng, server)
                world.stop.set()
                server.request_shutdown()
            await server.stopped.wait()
        report.virtual_seconds = trio.current_time() - world.started_at
        _leftovers(server, seen, report)
        await trio.testing.wait_all_tasks_blocked()
        if _count_tasks() != baseline:
            report.violations.append(f"{_count_tasks() - baseline} tasks left running")
    finally:
        logger.removeHandler(errors)
    for checker in checkers:
        report.violations.extend(checker.violations)
        report.counts.add(checker.counts)
    report.violations.extend(errors.records)
    report.client_seconds = world.client_seconds
    report.sessions = world.sessions
    report.refused = world.refused
    report.published = broker.truth.published
    report.dark = broker.truth.dark
    report.epochs = len(broker.truth.epochs)
    report.connections_seen = len(seen)
    report.wall_seconds = time.perf_counter() - wall
    return report


async def _watch(
    plan: Plan, server: OdinServer, seen: dict[str, weakref.ref[Connection]], report: Report
) -> None:
    """Every virtual 0.25 s until the server stops: each connection's queue within its bounds:
    the configured bound, plus what a subscribe forces past it, per channel recovered (its
    replay, the live messages held meanwhile, a notice before each of them, and one for what
    did not fit the hold), plus a few replies and pings."""
    per_channel = plan.recovery_max + 2 * plan.queue_messages + 1
    registry = server.context.registry
    covered: dict[tuple[str, int], int] = {}
    while not server.stopped.is_set():
        for connection in registry.connections.values():
            if connection.id not in seen:
                seen[connection.id] = weakref.ref(connection)
            keys = connection.session.subscriptions
            key = (connection.id, len(keys))
            channels = covered.get(key)
            if channels is None:
                channels = covered[key] = sum(
                    1 for name in CHANNELS if any(matches(key, name) for key in keys)
                )
            forced = max(1, channels) * per_channel + 16
            max_messages = plan.queue_messages + forced
            max_bytes = plan.queue_bytes + forced * 2048
            writer = connection.writer
            queued = writer.queued_messages
            report.max_queued = max(report.max_queued, queued)
            if queued > max_messages or writer.queued_bytes > max_bytes:
                report.violations.append(
                    f"connection {connection.id}: {queued} frames / {writer.queued_bytes} bytes "
                    f"queued, over the bound ({max_messages} / {max_bytes})"
                )
        with trio.move_on_after(0.25):
            await server.stopped.wait()


def _leftovers(server: OdinServer, seen: dict[str, Any], report: Report) -> None:
    context = server.context
    found = []
    if context.registry.connections:
        found.append(f"{len(context.registry.connections)} connections still registered")
    if context.registry.admitted:
        found.append(f"{context.registry.admitted} connection places still taken")
    if context.hub.keys or context.hub.subscriptions:
        found.append(f"hub still indexes {context.hub.keys} keys")
    gc.collect()
    alive = [name for name, ref in seen.items() if ref() is not None]
    if alive:
        found.append(f"connections (their seams, outboxes) still alive: {alive[:5]}")
    report.violations.extend(f"after the drain: {problem}" for problem in found)

"""Odin's own NATS connections (``link.py``) on a three-node cluster, seeded with ONE node:
they learn the others from the servers' INFO, so losing the seed for good (SIGKILL) or its
lame-duck mode moves them to another node, and the delivery resumes after the last position
it handed on, with nothing lost or repeated."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest
import trio

from odin_fanout.broker.nats import NatsBroker, open_nats_broker
from odin_fanout.broker.nats.link import Link
from odin_fanout.logs import get_logger
from odin_fanout.protocol.publication import Gap
from tests.helpers import capture_logs
from tests.nats.cluster import NatsCluster
from tests.nats.support import RawPublisher, nats_config, wait_until

pytestmark = [pytest.mark.trio, pytest.mark.slow]

STREAM = "ODIN_TOKENS"
CHANNEL = "BTC.trade"
RATE = 200
"""Publications per second."""
PUBLISH_SECONDS = 6.0
KILL_AFTER = 1.5
FAILOVER_BOUND = 2.0
"""Seconds from the seed's loss to deliveries again when JetStream answers at once (the
link's reconnect plus the consumer's recreation; see delivery.py)."""
LEADER_FAILOVER_BOUND = 12.0
"""The same when the node led JetStream (the meta leader) or the stream: the others elect a
new leader first."""
SETTINGS = {"nats.replicas": 3}


@asynccontextmanager
async def broker_on(url: str, *, consume: bool = True) -> AsyncIterator[NatsBroker]:
    config = nats_config(url, **SETTINGS)
    log = get_logger(service="odin-test")
    async with open_nats_broker(
        config.nats, feed_capacity=100_000, log=log, consume=consume
    ) as broker:
        with trio.fail_after(20):
            await broker.wait_ready()
        yield broker


def links(broker: NatsBroker) -> list[Link]:
    return [broker.links["delivery"], broker.links["publish"]]


def on_node(link: Link, cluster: NatsCluster, index: int) -> bool:
    server = link.server
    return server is not None and server.port == cluster.nodes[index].port


def moved(broker: NatsBroker, cluster: NatsCluster, seed: int) -> bool:
    """Connected, each of its links to a node other than ``seed``."""
    return broker.status().connected and all(
        link.connected and not on_node(link, cluster, seed) for link in links(broker)
    )


async def stream_last_seq(port: int) -> int:
    """The stream's last sequence, asked of the node on ``port`` (not through
    ``NatsCluster.api``: its client retries a node in lame-duck mode for ever)."""
    with trio.fail_after(15):
        while True:
            publisher = await RawPublisher.connect(port)
            try:
                info = orjson.loads(await publisher.request(f"$JS.API.STREAM.INFO.{STREAM}"))
            finally:
                await publisher.aclose()
            if "error" not in info:
                last_seq: int = info["state"]["last_seq"]
                return last_seq
            await trio.sleep(0.1)


async def prepare(cluster: NatsCluster) -> int:
    """The stream with three replicas, all current; returns its leader's index."""
    await cluster.wait_ready()
    async with broker_on(cluster.url(), consume=False):
        pass
    return await cluster.leader(STREAM)


class Run:
    """A consumer seeded with node ``seed`` only, a publisher on the other nodes publishing
    at ``RATE``, and ``disrupt`` called after ``KILL_AFTER``; the figures afterwards."""

    def __init__(self) -> None:
        self.received: list[tuple[int, int, float]] = []  # (seq, n, arrival)
        self.gaps: list[Gap] = []
        self.disrupted_at = 0.0
        self.connected_again = 0.0
        self.stored = 0
        self.elections = False
        """Whether JetStream left the consumer's creation unanswered for a while (it was
        electing a leader)."""

    async def go(self, cluster: NatsCluster, seed: int, disrupt: str) -> None:
        others = ",".join(url for index, url in enumerate(cluster.urls) if index != seed)
        survivor = cluster.nodes[(seed + 1) % 3].port
        with capture_logs() as logs:
            await self._go(cluster, seed, disrupt, others, survivor)
        self.elections = any(entry["event"] == "nats_consumer_retry" for entry in logs)

    async def _go(
        self, cluster: NatsCluster, seed: int, disrupt: str, others: str, survivor: int
    ) -> None:
        async with (
            broker_on(cluster.nodes[seed].url) as consumer,
            broker_on(others, consume=False) as publisher,
            consumer.open_feed() as feed,
            trio.open_nursery() as nursery,
        ):
            # Discovered: every node is known although only the seed was configured.
            for link in links(consumer):
                await wait_until(lambda link=link: len(link.servers) == 3, timeout=5)
                assert on_node(link, cluster, seed)

            async def receive() -> None:
                async for item in feed:
                    if isinstance(item, Gap):
                        self.gaps.append(item)
                        continue
                    n = orjson.loads(item.payload)["n"]
                    self.received.append((item.seq, n, time.monotonic()))

            async def disrupt_seed() -> None:
                await trio.sleep(KILL_AFTER)
                self.disrupted_at = time.monotonic()
                if disrupt == "kill":
                    cluster.kill(seed)
                else:
                    process = cluster.nodes[seed].process
                    assert process is not None
                    os.kill(process.pid, signal.SIGUSR2)  # lame-duck mode
                await wait_until(lambda: moved(consumer, cluster, seed), timeout=30)
                self.connected_again = time.monotonic()

            nursery.start_soon(receive)
            nursery.start_soon(disrupt_seed)
            start = trio.current_time()
            for n in range(int(RATE * PUBLISH_SECONDS)):
                await trio.sleep_until(start + n / RATE)
                try:
                    await publisher.publish(CHANNEL, orjson.dumps({"n": n}), msg_id=f"m{n}")
                except Exception:
                    continue
            with trio.fail_after(15):
                await publisher.drain()
            self.stored = await stream_last_seq(survivor)
            await wait_until(lambda: len(self.received) >= self.stored, timeout=20)
            await trio.sleep(0.5)  # nothing more may come
            # On another node now, and the instance is connected.
            for link in links(consumer):
                assert link.connected
                assert not on_node(link, cluster, seed)
            assert consumer.status().connected
            nursery.cancel_scope.cancel()

    @property
    def resumed_after(self) -> float:
        """Seconds from the disruption to the first delivery that followed it (the one
        around it that arrived last, if deliveries never stopped)."""
        arrivals = [arrival for _, _, arrival in self.received]
        after = [
            later - max(earlier, self.disrupted_at)
            for earlier, later in itertools.pairwise(arrivals)
            if later >= self.disrupted_at
        ]
        return max(after, default=0.0)

    def check(self) -> None:
        seqs = [seq for seq, _, _ in self.received]
        numbers = [n for _, n, _ in self.received]
        assert self.gaps == []
        assert seqs == list(range(1, self.stored + 1))  # every stored one, once, in order
        # Stored once each (message ids); their order is the publish side's (its retries).
        assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_the_seed_killed_for_good(cluster: NatsCluster, role: str) -> None:
    leader = await prepare(cluster)
    seed = leader if role == "leader" else (leader + 1) % 3
    run = Run()
    await run.go(cluster, seed, "kill")
    run.check()
    print(  # the figures the report quotes (pytest -s)
        f"\nseed ({role} of the stream) killed: stored {run.stored}, delivery resumed after "
        f"{run.resumed_after:.2f} s, connected again after "
        f"{run.connected_again - run.disrupted_at:.2f} s, JetStream elections in the way: "
        f"{run.elections}"
    )
    assert run.resumed_after < (LEADER_FAILOVER_BOUND if run.elections else FAILOVER_BOUND)


async def test_lame_duck_mode_moves_the_links_off_the_node(cluster: NatsCluster) -> None:
    leader = await prepare(cluster)
    seed = (leader + 1) % 3
    run = Run()
    await run.go(cluster, seed, "ldm")
    run.check()
    print(
        f"\nseed in lame-duck mode: delivery resumed after {run.resumed_after:.2f} s, "
        f"JetStream elections in the way: {run.elections}"
    )
    # The links left before the server's grace period (10 s) would have closed them.
    assert run.resumed_after < (LEADER_FAILOVER_BOUND if run.elections else FAILOVER_BOUND)

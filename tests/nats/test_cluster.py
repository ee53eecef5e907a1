"""Odin on a three-node NATS cluster: a stream of three replicas, never downgraded; losing
the stream's leader while publishing loses, reorders and repeats nothing of what the stream
stored; and the history outlives a restart of every node."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest
import trio

from odin_fanout.broker.base import BrokerError
from odin_fanout.broker.nats import NatsBroker, open_nats_broker
from odin_fanout.logs import get_logger
from odin_fanout.protocol.publication import Gap
from tests.helpers import capture_logs
from tests.nats.cluster import NatsCluster
from tests.nats.support import nats_config, wait_until

pytestmark = [pytest.mark.trio, pytest.mark.slow]

STREAM = "ODIN_TOKENS"
CHANNEL = "BTC.trade"
# Publications per second while the leader is killed, and for how long.
RATE = 200
PUBLISH_SECONDS = 5.0
KILL_AFTER = 1.5
# Bounds of the failover. Measured on loopback, sixteen runs: the deliveries fell silent for
# 5.1-9.0 s after the kill, nearly all of it the stream's writes stalled (4.3-8.2 s) while
# the cluster elected a new leader (nats-server randomises its election timeout); a message
# stored after the kill waited at most 0.75 s to be delivered (nats.consumer_heartbeat is
# 0.5 s here).
RESUME_BOUND = 12.0
"""Longest silence of the deliveries after the kill: the cluster's election and Odin's
resumption together."""
LATENCY_BOUND = 3.0
"""Longest a stored message may wait to be delivered: Odin's own part of the resumption."""


@asynccontextmanager
async def broker_on(
    url: str, replicas: int, *, consume: bool = True, max_msgs: int = 1_000_000
) -> AsyncIterator[NatsBroker]:
    config = nats_config(url, **{"nats.replicas": replicas, "nats.max_msgs": max_msgs})
    log = get_logger(service="odin-test")
    async with open_nats_broker(
        config.nats, feed_capacity=100_000, log=log, consume=consume
    ) as broker:
        with trio.fail_after(20):
            await broker.wait_ready()
        yield broker


async def test_the_stream_gets_three_replicas_and_is_never_downgraded(
    cluster: NatsCluster,
) -> None:
    await cluster.wait_ready()
    async with broker_on(cluster.url(), 3):
        pass
    info = await cluster.stream_info(STREAM)
    assert info is not None
    assert info["config"]["num_replicas"] == 3
    assert len(info["cluster"]["replicas"]) == 2  # the leader's two followers
    with capture_logs() as logs:
        async with broker_on(cluster.url(), 1, max_msgs=2_000_000):
            pass
    info = await cluster.stream_info(STREAM)
    assert info is not None
    assert info["config"]["num_replicas"] == 3  # kept
    assert info["config"]["max_msgs"] == 2_000_000  # raised
    (differs,) = [entry for entry in logs if entry["event"] == "stream_config_differs"]
    assert differs["fields"] == {"num_replicas": {"stream": 3, "odin": 1}}
    (updated,) = [entry for entry in logs if entry["event"] == "stream_updated"]
    assert updated["fields"] == {"max_msgs": {"from": 1_000_000, "to": 2_000_000}}


async def test_losing_the_stream_leader_while_publishing(cluster: NatsCluster) -> None:
    await cluster.wait_ready()
    async with broker_on(cluster.url(), 3):
        pass  # the stream exists, with three replicas
    leader = await cluster.leader(STREAM)
    # Both connect to the leader's node first: losing it loses their connections too.
    url = cluster.url(first=leader)
    received: list[tuple[int, int, float, float]] = []  # (seq, n, arrived, stored), Unix s
    gaps: list[Gap] = []
    published = 0
    refused: list[str] = []
    killed_at = 0.0
    async with (
        broker_on(url, 3) as consumer,
        broker_on(url, 3, consume=False) as publisher,
        consumer.open_feed() as feed,
        trio.open_nursery() as nursery,
    ):

        async def receive() -> None:
            async for item in feed:
                if isinstance(item, Gap):
                    gaps.append(item)
                    continue
                n = orjson.loads(item.payload)["n"]
                received.append((item.seq, n, time.time(), item.ts))

        async def kill_the_leader() -> None:
            nonlocal killed_at
            await trio.sleep(KILL_AFTER)
            killed_at = time.time()
            cluster.kill(leader)

        nursery.start_soon(receive)
        nursery.start_soon(kill_the_leader)
        start = trio.current_time()
        for n in range(int(RATE * PUBLISH_SECONDS)):
            await trio.sleep_until(start + n / RATE)
            try:
                await publisher.publish(CHANNEL, orjson.dumps({"n": n}), msg_id=f"m{n}")
                published += 1
            except BrokerError as exc:  # counted: the publish side's loss
                refused.append(str(exc))
        with trio.fail_after(15):
            await publisher.drain()
        stats = publisher.stats()
        stored = await stream_state(cluster)
        await wait_until(lambda: len(received) >= stored, timeout=15)
        await trio.sleep(0.5)  # nothing more may come
        nursery.cancel_scope.cancel()
    seqs = [seq for seq, _, _, _ in received]
    numbers = [n for _, n, _, _ in received]
    pairs = list(itertools.pairwise(received))
    # The longest silence of the deliveries after the kill, and of the stream's writes
    # (its store times): the difference is Odin's part, the rest the cluster's election.
    silence = max(b[2] - a[2] for a, b in pairs if b[2] >= killed_at)
    stalled = max(b[3] - a[3] for a, b in pairs)
    # Messages stored before the kill but not yet delivered wait for the election with the
    # rest; those stored after it measure Odin's resumption.
    latency = max(
        arrived - stored_at for _, _, arrived, stored_at in received if stored_at > killed_at
    )
    lost = int(RATE * PUBLISH_SECONDS) - stored
    print(  # the figures the report quotes (pytest -s)
        f"\ncluster failover: published {published}, refused {len(refused)} "
        f"({sorted(set(refused))}), stored {stored}, "
        f"lost on the publish side {lost}, publish_failed {stats.publish_failed}, "
        f"longest silence of deliveries after the kill {silence:.2f} s, of the stream's "
        f"writes {stalled:.2f} s, longest wait of a message stored after the kill {latency:.2f} s"
    )
    # The consumer side: every stored message delivered exactly once, in stream order.
    assert gaps == []
    assert seqs == list(range(1, stored + 1))
    assert len(set(numbers)) == len(numbers)
    assert numbers == sorted(numbers)
    assert silence < RESUME_BOUND
    assert latency < LATENCY_BOUND
    # The publish side: losses (a 503 during the election burning the retries) are reported
    # above, not asserted; its retries across elections are fixed in publish.py separately.


async def stream_state(cluster: NatsCluster) -> int:
    """The stream's last sequence, once a leader answers."""
    with trio.fail_after(15):
        while True:
            info = await cluster.stream_info(STREAM)
            if info is not None:
                last_seq: int = info["state"]["last_seq"]
                return last_seq
            await trio.sleep(0.1)


async def test_the_history_survives_a_restart_of_every_node(cluster: NatsCluster) -> None:
    await cluster.wait_ready()
    async with broker_on(cluster.url(), 3) as publisher:
        for n in range(20):
            await publisher.publish(CHANNEL, orjson.dumps({"n": n}), msg_id=f"r{n}")
        with trio.fail_after(10):
            await publisher.drain()
        epoch = publisher.epoch
    before = await cluster.stream_info(STREAM)
    assert before is not None
    assert before["state"]["last_seq"] == 20
    cluster.stop()
    for index in range(len(cluster.nodes)):
        cluster.start(index)
    await cluster.wait_ready(timeout=30)
    await cluster.leader(STREAM, timeout=30)
    after = await cluster.stream_info(STREAM)
    assert after is not None
    assert after["created"] == before["created"]
    assert after["state"]["messages"] == 20
    assert after["config"]["num_replicas"] == 3
    async with broker_on(cluster.url(), 3) as broker:
        assert broker.epoch == epoch  # same history: positions stay valid
        page = await broker.read_after(CHANNEL, 15, 10)
        assert [(p.seq, p.prev) for p in page.messages] == [
            (16, 15), (17, 16), (18, 17), (19, 18), (20, 19)
        ]  # fmt: skip
        async with broker.open_feed() as feed:
            await broker.publish(CHANNEL, orjson.dumps({"n": 20}), msg_id="r20")
            with trio.fail_after(10):
                async for item in feed:
                    if not isinstance(item, Gap) and orjson.loads(item.payload)["n"] == 20:
                        assert (item.seq, item.prev) == (21, 20)
                        break

"""A stream leader dies under load: nothing is lost between the publisher and the clients.

Three NATS nodes, a stream with three replicas, two ``odin serve`` processes each seeded
with one node, the publisher service seeded with the third, publishing 200 events/s. Five
v1 clients per Odin instance follow both channels. The node leading the stream is killed
(SIGKILL) and started again 8 s later. Every event the publisher reports published reaches
every client once, in order (positions linked per channel, no gap notice), no client loses
its connection, and delivery resumes within ``RESUME_BOUND`` of the kill."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.e2e.process import odin_process, port_of
from tests.e2e.test_publisher_cli import CLEAN_ENV
from tests.helpers import Client, checkpoint_chain, open_client
from tests.nats.cluster import nats_cluster
from tests.publisher.support import call

pytestmark = [pytest.mark.trio, pytest.mark.slow]

STREAM = "ODIN_TOKENS"
CHANNELS = ["BTC.trade", "ETH.trade"]
RATE = 200
CLIENTS_PER_ODIN = 5
RESUME_BOUND = 12.0
"""Seconds from the kill until every client receives events again."""
NATS_SETTINGS = [
    "--set", "nats.replicas=3",
    "--set", "nats.ping_interval=0.5",
    "--set", "nats.max_outstanding_pings=2",
    "--set", "nats.reconnect_wait_min=0.1",
    "--set", "nats.reconnect_wait_max=1",
    "--set", "nats.publish_ack_timeout=2",
]  # fmt: skip


ROOMY_QUEUES = [
    "--set", "connection.queue_max_messages=20000",
    "--set", "connection.queue_max_bytes=16777216",
]  # fmt: skip
"""After the election the publisher's held events are stored in a burst (about 1,000 to 1,800
here) that the ten clients of this one test process, sharing two cores with two Odins, three
nats-servers and the publisher, can read slower than their queue's default 1,024 messages
allow: they would be closed as slow consumers (1008), which is the policy working, not what
this test is about."""


@attrs.define
class Follower:
    """What one client received: events (with their arrival time), anything unexpected."""

    events: list[dict[str, Any]] = attrs.Factory(list)
    arrivals: list[float] = attrs.Factory(list)
    other: list[dict[str, Any]] = attrs.Factory(list)
    closed: str | None = None

    async def follow(self, client: Client) -> None:
        try:
            while True:
                message = json.loads(await client.ws.get_message())
                if "seq" in message:
                    self.events.append(message)
                    self.arrivals.append(trio.current_time())
                elif message.get("type") != "ping":
                    self.other.append(message)
        except ConnectionClosed as exc:
            self.closed = repr(exc.reason)

    def longest_silence_after(self, moment: float) -> float:
        """The longest wait for an event from ``moment`` on (a stall across the kill)."""
        times = [moment, *(t for t in self.arrivals if t > moment)]
        return max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else 0


def broker_log(odin: Any) -> list[str]:
    """What an Odin logged about NATS (to say why deliveries stopped)."""
    return [
        f"{r['event']} { ({k: v for k, v in r.items() if k not in ('event', 'timestamp')}) }"
        for r in odin.records()
        if r["event"].startswith(
            ("nats", "stream", "broker", "epoch", "slow_consumer", "conn_close")
        )
    ]


async def publisher_stats(port: int) -> dict[str, Any]:
    status, document = await call(port, "GET", "/stats")
    assert status == 200, document
    stats: dict[str, Any] = document["stats"]
    return stats


async def test_a_stream_leader_failover_loses_no_event(tmp_path: Path) -> None:
    with nats_cluster(tmp_path / "cluster") as cluster:
        await cluster.wait_ready()

        def serve(node: int) -> list[str]:
            return ["serve", "--port", "0", "--workers", "1", "--broker", "nats",
                    "--nats-url", cluster.urls[node], *NATS_SETTINGS, *ROOMY_QUEUES]  # fmt: skip

        with odin_process(serve(0)) as first, odin_process(serve(1)) as second:
            odins = (first, second)
            for odin in odins:
                odin.follow()
            ports = [port_of(odin.wait_for("listening", timeout=30)) for odin in odins]
            for odin in odins:
                odin.wait_for("broker_ready", timeout=30)
            leader = await cluster.leader(STREAM)
            followers = [Follower() for _ in range(CLIENTS_PER_ODIN * len(ports))]
            async with trio.open_nursery() as nursery:
                clients = []
                for index, follower in enumerate(followers):
                    client = await nursery.start(hold_client, ports[index % len(ports)], follower)
                    clients.append(client)
                args = ["--port", "0", "--nats-url", cluster.urls[2], "--autostart",
                        "--rate", str(RATE), "--tokens", "BTC,ETH", "--events", "trade",
                        *NATS_SETTINGS]  # fmt: skip
                with odin_process(args, env=CLEAN_ENV, module="odin_fanout.publisher") as publisher:
                    publisher.follow()
                    listening = publisher.wait_for("listening", timeout=30)
                    api = int(listening["urls"][0].rsplit(":", 1)[1].split("/", 1)[0])
                    await trio.sleep(4.0)
                    killed_at = trio.current_time()
                    await trio.to_thread.run_sync(cluster.kill, leader)
                    await trio.sleep(8.0)
                    await trio.to_thread.run_sync(cluster.start, leader)
                    await trio.sleep(4.0)
                    status, _ = await call(api, "POST", "/control", {"action": "stop"})
                    assert status == 200
                    stats = await publisher_stats(api)
                    with trio.move_on_after(20):  # until every publish is settled
                        while (stats := await publisher_stats(api))["inFlight"] or not all(
                            len(f.events) >= stats["messagesPublished"] for f in followers
                        ):
                            await trio.sleep(0.2)
                    received = [len(f.events) for f in followers]
                    assert not stats["inFlight"], stats
                    if not all(n >= stats["messagesPublished"] for n in received):
                        for odin in odins:
                            print("\n".join(broker_log(odin)))
                        closed = [f.closed for f in followers]
                        raise AssertionError(f"{stats} received {received} closed {closed}")
                    await trio.sleep(0.5)  # anything more (a duplicate) would show
                nursery.cancel_scope.cancel()
    published = stats["messagesPublished"]
    silences = [follower.longest_silence_after(killed_at) for follower in followers]
    print(f"published={published} errors={stats['errors']} dropped={stats['dropped']} "
          f"retries={stats['retries']} received={[len(f.events) for f in followers]} "
          f"longest_silence={max(silences):.2f}s")  # fmt: skip
    assert published >= RATE * 14  # it published throughout (16 s at 200/s, give or take)
    assert (stats["errors"], stats["dropped"]) == (0, 0)
    for follower in followers:
        assert follower.closed is None
        assert follower.other == []  # no gap notice, no error
        assert checkpoint_chain(follower.events, {}) == []  # linked, in order, no position twice
        nonces = [event["data"]["nonce"] for event in follower.events]
        stored_twice = len(nonces) - len(set(nonces))
        assert (len(set(nonces)), stored_twice) == (published, 0)  # every event, once
        assert {event["channel"] for event in follower.events} == set(CHANNELS)
    assert max(silences) < RESUME_BOUND


async def hold_client(
    port: int, follower: Follower, *, task_status: trio.TaskStatus[Client]
) -> None:
    async with open_client(port) as client:
        await client.subscribe(CHANNELS)
        task_status.started(client)
        await follower.follow(client)

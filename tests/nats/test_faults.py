"""Faults between Odin and NATS: the server killed and restarted, a silent partition. Odin
stays up, clients stay connected, each channel's stream stays linked with nothing duplicated,
and everything JetStream kept reaches the clients."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import pytest
import trio

from odin_fanout.broker.nats import NatsBroker
from tests.helpers import Client, Harness, Message, http_get
from tests.nats.support import (
    NatsServer,
    Proxy,
    RawPublisher,
    nats_config,
    odin_on_nats,
    wait_until,
)

pytestmark = [pytest.mark.trio, pytest.mark.slow]

CHANNELS = ("BTC.trade", "ETH.trade", "SOL.trade")


class Publishing:
    """Publishes round-robin on the channels at a steady pace, reconnecting when NATS goes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self.failed = 0
        self.stop = trio.Event()

    async def run(self) -> None:
        publisher: RawPublisher | None = None
        while not self.stop.is_set():
            try:
                if publisher is None:
                    publisher = await RawPublisher.connect(self.port)
                channel = CHANNELS[self.sent % len(CHANNELS)]
                await publisher.publish(f"odin.token.{channel}", {"n": self.sent})
                if self.sent % 10 == 0:
                    await publisher.flush()
                self.sent += 1
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, RuntimeError):
                self.failed += 1
                if publisher is not None:
                    await trio.aclose_forcefully(publisher.stream)
                publisher = None
            await trio.sleep(0.004)
        if publisher is not None:
            await publisher.aclose()


async def read_until_done(client: Client, into: list[Message], done: trio.Event) -> None:
    """Collect events and gap notices until every channel's end marker arrived."""
    ended: set[str] = set()
    while ended != set(CHANNELS):
        message = await client.recv(timeout=30)
        into.append(message)
        if message.get("data") == {"end": True}:
            ended.add(message["channel"])
    done.set()


def check_stream(received: list[Message], start: dict[str, int]) -> list[int]:
    """Per channel: no duplicate, no reordering, every event linked to the one before or to
    an announced gap. Returns the positions received."""
    last = dict(start)
    seqs = []
    for message in received:
        channel = message["channel"]
        if message["type"] == "gap":
            assert message["from"] > last[channel]
            last[channel] = message["to"]
            continue
        assert message["seq"] > last[channel], f"duplicate or reordered: {message}"
        assert message["prev"] == last[channel], f"silent gap before {message}"
        last[channel] = message["seq"]
        seqs.append(message["seq"])
    return seqs


async def replayed_positions(client: Client, start: dict[str, int]) -> list[int]:
    """Everything the history holds after the client's starting positions, per replay."""
    positions = []
    for channel in CHANNELS:
        await client.send({"type": "replay", "data": {"channel": channel, "since": start[channel]}})
        while True:
            message = await client.recv(timeout=10)
            if message["type"] == "replay_complete":
                break
            assert message["type"] != "replay_incomplete", message
            if "seq" in message and message["channel"] == channel:
                positions.append(message["seq"])
    return positions


Fault = Callable[[Harness, NatsBroker, Publishing], Awaitable[None]]


async def published_more(publishing: Publishing, count: int) -> None:
    """Wait until ``count`` more messages went to NATS (the steady pace makes it ~4 ms each)."""
    target = publishing.sent + count
    await wait_until(lambda: publishing.sent >= target, timeout=20)


async def run_fault(nats_url: str, publish_port: int, fault: Fault) -> int:
    """Run the scenario; returns how many times Odin lost its connection to NATS."""
    config = nats_config(nats_url)
    async with odin_on_nats(config) as (harness, broker):
        await broker.wait_ready()
        async with harness.client() as client:
            ack = await client.subscribe(list(CHANNELS))
            start = {ch: ack["positions"][ch]["seq"] for ch in CHANNELS}
            received: list[Message] = []
            done = trio.Event()
            publishing = Publishing(publish_port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until_done, client, received, done)
                nursery.start_soon(publishing.run)
                # Traffic flowing end to end before the fault, and published after it.
                await wait_until(lambda: len(received) >= 50, timeout=20)
                await fault(harness, broker, publishing)
                await published_more(publishing, 100)
                publishing.stop.set()
                await wait_until(lambda: broker.status().connected, timeout=20)
                ender = await RawPublisher.connect(publish_port)
                for channel in CHANNELS:
                    await ender.publish(f"odin.token.{channel}", {"end": True})
                await ender.flush()
                await ender.aclose()
                with trio.fail_after(30):
                    await done.wait()
            got = check_stream(received, start)
            assert len(got) == len(set(got))
            # Everything JetStream kept after the start reached the client, once.
            kept = await replayed_positions(client, start)
            assert sorted(got) == sorted(kept)
            assert publishing.sent > 100
        return broker.stats().disconnects


async def test_nats_killed_and_restarted_under_publishing(nats_server: NatsServer) -> None:
    async def kill_and_restart(harness: Harness, broker: NatsBroker, _: Publishing) -> None:
        await trio.to_thread.run_sync(nats_server.kill)
        # Down until Odin has noticed (a restart before that could go unseen).
        await wait_until(lambda: not broker.status().connected, timeout=20)
        # Degraded, not unhealthy: its clients are still served, a restart would only cut them.
        status, _headers, body = await http_get(harness.port, "/health")
        health = orjson.loads(body)
        assert (status, health["status"], health["healthy"]) == (200, "degraded", True)
        assert health["checks"]["broker"]["healthy"] is False
        assert (await http_get(harness.port, "/ready"))[0] == 503
        await trio.to_thread.run_sync(nats_server.start)

    assert await run_fault(nats_server.url, nats_server.port, kill_and_restart) >= 1


async def test_a_silent_partition_is_detected_and_healed(nats_server: NatsServer) -> None:
    proxy = Proxy(nats_server.port)
    async with trio.open_nursery() as proxy_tasks:
        await proxy_tasks.start(proxy.serve)

        async def partition(harness: Harness, broker: NatsBroker, publishing: Publishing) -> None:
            proxy.set("blackhole")
            # Nothing closes the connection: only the pings (ping_interval 0.5 s x (2
            # outstanding + 1), about 1.5 s) can notice. The bound is loose, for a loaded
            # machine, but far below what TCP alone would take.
            await wait_until(lambda: not broker.status().connected, timeout=8)
            status, _, _ = await http_get(harness.port, "/ready")
            assert status == 503
            await published_more(publishing, 100)  # publishing goes on, straight to NATS
            proxy.set("pass")

        lost = await run_fault(f"nats://127.0.0.1:{proxy.port}", nats_server.port, partition)
        proxy_tasks.cancel_scope.cancel()
    assert lost >= 1


async def test_a_stream_recreated_while_odin_was_cut_off_is_read_as_a_new_history(
    nats_server: NatsServer,
) -> None:
    """Another Odin or an operator recreates the stream while this Odin cannot see NATS: when
    it is back it must not read the new stream on from its old position, under its old epoch."""
    proxy = Proxy(nats_server.port)
    async with trio.open_nursery() as proxy_tasks:
        await proxy_tasks.start(proxy.serve)
        # The periodic stream check is pushed out of the way: the delivery must notice alone.
        config = nats_config(
            f"nats://127.0.0.1:{proxy.port}", **{"nats.stream_check_interval": 3600.0}
        )
        async with odin_on_nats(config) as (harness, broker):
            await broker.wait_ready()
            old_epoch = broker.epoch
            publisher = await RawPublisher.connect(nats_server.port)
            async with harness.client() as client:
                await client.subscribe(["BTC.trade"])
                for n in (1, 2):
                    await publisher.publish("odin.token.BTC.trade", {"n": n})
                await publisher.flush()
                before = await client.events(2)
                proxy.set("reset")
                await wait_until(lambda: not broker.status().connected)
                deleted = await publisher.request("$JS.API.STREAM.DELETE.ODIN_TOKENS")
                assert b'"success":true' in deleted
                stream = {"name": "ODIN_TOKENS", "subjects": ["odin.token.>"],
                          "storage": "memory", "allow_direct": True}  # fmt: skip
                created = await publisher.request(
                    "$JS.API.STREAM.CREATE.ODIN_TOKENS", orjson.dumps(stream)
                )
                assert b'"error"' not in created
                for n in (3, 4, 5):
                    await publisher.publish("odin.token.BTC.trade", {"n": n})
                await publisher.flush()
                proxy.set("pass")
                after = await client.events(3)
            await publisher.aclose()
            new_epoch = broker.epoch
        proxy_tasks.cancel_scope.cancel()
    assert {event["epoch"] for event in before} == {old_epoch}
    assert new_epoch != old_epoch
    assert [(e["data"]["n"], e["epoch"], e["seq"], e["prev"]) for e in after] == [
        (3, new_epoch, 1, 0),
        (4, new_epoch, 2, 1),
        (5, new_epoch, 3, 2),
    ]

"""Publishes while the NATS connections are down (the server stopped and started again on
its file store): ``publish`` queues them rather than refusing, and they go out once the
connection is back, each stored once, in order. Past the retry window they are dropped and
counted; the queue stays bounded and refuses only when full."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from odin_fanout.broker.base import BrokerError
from odin_fanout.broker.nats import NatsBroker, open_nats_broker
from odin_fanout.logs import get_logger
from tests.nats.support import NatsServer, nats_config, wait_until
from tests.publisher.support import stored_messages

pytestmark = [pytest.mark.trio, pytest.mark.slow]

CHANNELS = ("BTC.trade", "ETH.trade", "SOL.liquidity")


@asynccontextmanager
async def publishing_broker(server: NatsServer, **overrides: object) -> AsyncIterator[NatsBroker]:
    config = nats_config(
        server.url,
        **{
            "nats.storage": "file",
            "nats.reconnect_wait_max": 0.5,
            "nats.publish_ack_timeout": 1.0,
            **overrides,
        },
    )
    log = get_logger(service="odin-test")
    async with open_nats_broker(
        config.nats, feed_capacity=config.broker.feed_capacity, log=log, consume=False
    ) as broker:
        with trio.fail_after(15):
            await broker.wait_ready()
        yield broker


async def publish_paced(broker: NatsBroker, last: int, rate: int, refused: list[int]) -> None:
    """Events 1..last at ``rate`` per second, twenty times a second; refusals noted."""
    per_tick = rate // 20
    for start in range(1, last + 1, per_tick):
        for n in range(start, min(start + per_tick, last + 1)):
            try:
                await broker.publish(CHANNELS[n % 3], json.dumps({"n": n}).encode(), f"id-{n}")
            except BrokerError:
                refused.append(n)
        await trio.sleep(0.05)


async def stored(port: int) -> list[int]:
    return [message["data"]["n"] for message in await stored_messages(port)]


async def outage(server: NatsServer, after: float, down: float) -> None:
    await trio.sleep(after)
    await trio.to_thread.run_sync(server.stop)
    await trio.sleep(down)
    await trio.to_thread.run_sync(server.start)


async def test_publishes_while_the_server_restarts_are_queued_and_stored_once_in_order(
    nats_server: NatsServer,
) -> None:
    """200 events/s for 5 s; the server is down for 2 s of it: none refused, none lost."""
    refused: list[int] = []
    async with publishing_broker(nats_server) as broker:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage, nats_server, 1.0, 2.0)
            await publish_paced(broker, 1000, 200, refused)
        stats = broker.stats()
        await wait_until(lambda: stats.published == 1000, timeout=20)
    assert refused == []
    assert await stored(nats_server.port) == list(range(1, 1001))  # once each, in order
    assert (stats.publish_failed, stats.publish_dropped) == (0, 0)
    assert stats.disconnects >= 1


async def test_publishes_queued_longer_than_the_retry_window_are_dropped_and_counted(
    nats_server: NatsServer,
) -> None:
    """A 1 s retry window (a 2 s duplicate window), a 3 s outage: what waited longer than
    the window is dropped and counted, the rest stored once, in order."""
    refused: list[int] = []
    async with publishing_broker(nats_server, **{"nats.duplicate_window": 2.0}) as broker:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage, nats_server, 1.0, 3.0)
            await publish_paced(broker, 1200, 200, refused)
        stats = broker.stats()
        await wait_until(lambda: stats.published + stats.publish_dropped == 1200, timeout=20)
        await wait_until(lambda: broker.stats().publish_in_flight == 0)
    assert refused == []
    kept = await stored(nats_server.port)
    assert kept == sorted(set(kept))  # in order, once each
    assert len(kept) == stats.published
    assert stats.publish_dropped >= 200  # about 2 s of the 3 s outage at 200/s
    assert stats.publish_failed == stats.publish_dropped
    assert kept[-1] == 1200  # publishing went on afterwards


async def test_a_full_queue_refuses_and_says_which_connection_is_down(
    nats_server: NatsServer,
) -> None:
    async with publishing_broker(nats_server, **{"nats.publish_queue": 50}) as broker:
        await trio.to_thread.run_sync(nats_server.stop)
        await wait_until(lambda: not broker.links["publish"].connected)
        for n in range(1, 51):
            await broker.publish("BTC.trade", json.dumps({"n": n}).encode(), f"id-{n}")
        with pytest.raises(BrokerError, match=r"queue is full .*connection is down"):
            await broker.publish("BTC.trade", b"{}", "id-51")
        assert broker.stats().publish_failed == 1
        await trio.to_thread.run_sync(nats_server.start)
        await wait_until(lambda: broker.stats().published == 50, timeout=15)
    assert await stored(nats_server.port) == list(range(1, 51))


async def test_publishes_are_refused_once_the_broker_is_closing(nats_server: NatsServer) -> None:
    async with publishing_broker(nats_server) as broker:
        await broker.publish("BTC.trade", b'{"n": 1}', "id-1")
        # Stored first: the publisher's connection may still be coming up.
        await wait_until(lambda: broker.stats().published == 1, timeout=10)
        broker.stop_publishing()
        with pytest.raises(BrokerError, match="closing"):
            await broker.publish("BTC.trade", b'{"n": 2}', "id-2")
        with pytest.raises(BrokerError, match="closing"):
            broker.publish_plain("odin.market.statistics", b"{}")
        assert broker.stats().publish_failed == 2
    assert await stored(nats_server.port) == [1]


async def test_publishes_a_broker_closes_on_are_counted_dropped_and_logged() -> None:
    """NATS never came up: what was queued cannot be stored, and the close says so."""
    import socket

    from tests.helpers import capture_logs

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = nats_config(f"nats://127.0.0.1:{port}")
    with capture_logs() as logs:
        async with open_nats_broker(
            config.nats, feed_capacity=config.broker.feed_capacity,
            log=get_logger(service="odin-test"), consume=False,
        ) as broker:  # fmt: skip
            for n in range(10):
                await broker.publish("BTC.trade", json.dumps({"n": n}).encode(), msg_id=f"m{n}")
            assert broker.stats().publish_in_flight == 10
    stats = broker.stats()
    assert (stats.published, stats.publish_dropped, stats.publish_in_flight) == (0, 10, 0)
    (dropped,) = [entry for entry in logs if entry["event"] == "publish_dropped"]
    assert dropped["count"] == 10
    assert dropped["error"] == "the broker closed before they were stored"

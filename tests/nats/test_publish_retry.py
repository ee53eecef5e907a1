"""Publishes that JetStream cannot take for a while (a stream leader election, a stream that
is missing, a server restarting) are retried with backoff within their bound, and stored
once each, in order; past the bound they are counted and logged; the buffer stays bounded.

A leader election is simulated on one real nats-server by moving the stream's subjects away
and back: in between, publishes to ``odin.token.>`` are answered 503 "no responders", as
they are while a cluster elects a stream leader, and what the stream holds stays."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from odin_fanout.broker.base import BrokerError, BrokerStats
from odin_fanout.broker.nats.link import LinkSettings
from odin_fanout.broker.nats.publish import JetStreamPublisher, retry_window
from odin_fanout.config import nats_addresses
from odin_fanout.logs import get_logger
from tests.nats.support import NatsServer, RawPublisher, wait_until
from tests.publisher.support import stored_messages

pytestmark = [pytest.mark.trio, pytest.mark.slow]

STREAM = "RETRY"
SUBJECTS = ("odin.token.BTC.trade", "odin.token.ETH.trade", "odin.token.SOL.liquidity")


async def stream_api(port: int, action: str, subjects: str) -> dict[str, Any]:
    config = {
        "name": STREAM,
        "subjects": [subjects],
        "storage": "file",
        "duplicate_window": 120 * 10**9,
        "num_replicas": 1,
    }
    client = await RawPublisher.connect(port)
    try:
        answer = json.loads(
            await client.request(f"$JS.API.STREAM.{action}.{STREAM}", json.dumps(config).encode())
        )
    finally:
        await client.aclose()
    assert "error" not in answer, answer
    return dict(answer)


async def create_stream(port: int) -> None:
    await stream_api(port, "CREATE", "odin.token.>")


async def elect(port: int, away: bool) -> None:
    """The stream stops (or starts again) answering publishes to odin.token.>."""
    await stream_api(port, "UPDATE", "elsewhere.>" if away else "odin.token.>")


@asynccontextmanager
async def running(
    server: NatsServer, *, capacity: int = 10_000, retry_for: float = 30.0
) -> AsyncIterator[tuple[JetStreamPublisher, BrokerStats, list[str]]]:
    stats = BrokerStats()
    failures: list[str] = []
    publisher = JetStreamPublisher(
        LinkSettings(
            servers=nats_addresses(server.url),
            ping_interval=0.5,
            max_outstanding_pings=2,
            connect_timeout=2.0,
            reconnect_wait_min=0.05,
            reconnect_wait_max=0.2,
        ),
        ack_timeout=1.0,
        capacity=capacity,
        retry_for=retry_for,
        stats=stats,
        on_failure=failures.append,
        log=get_logger(service="odin-test"),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        await wait_until(lambda: publisher.connected)
        yield publisher, stats, failures
        nursery.cancel_scope.cancel()


def publish(publisher: JetStreamPublisher, n: int) -> None:
    publisher.publish(SUBJECTS[n % len(SUBJECTS)], json.dumps({"n": n}).encode(), f"id-{n}")


async def publish_paced(publisher: JetStreamPublisher, first: int, last: int, rate: int) -> None:
    """Events ``first..last`` at ``rate`` per second, ten times a second."""
    per_tick = rate // 10
    for start in range(first, last + 1, per_tick):
        for n in range(start, min(start + per_tick, last + 1)):
            publish(publisher, n)
        await trio.sleep(0.1)


async def stored(port: int) -> list[int]:
    return [message["data"]["n"] for message in await stored_messages(port, STREAM)]


async def settled(publisher: JetStreamPublisher, timeout: float = 20) -> None:
    await wait_until(lambda: publisher.in_flight == 0 and publisher.retrying == 0, timeout)


async def test_the_retry_bound_is_half_the_duplicate_window_at_most_30_s() -> None:
    assert retry_window(120.0) == 30.0
    assert retry_window(10.0) == 5.0


async def test_publishes_during_a_leader_election_are_all_stored_once_in_order(
    nats_server: NatsServer,
) -> None:
    """500 events/s for 4 s; the stream answers 503 for 2 s of it: nothing is lost."""
    await create_stream(nats_server.port)
    async with running(nats_server) as (publisher, stats, failures):

        async def election() -> None:
            await trio.sleep(1.0)
            await elect(nats_server.port, away=True)
            await trio.sleep(2.0)
            await elect(nats_server.port, away=False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(election)
            await publish_paced(publisher, 1, 2000, rate=500)
        await settled(publisher)
    assert await stored(nats_server.port) == list(range(1, 2001))  # once each, in order
    assert stats.published == 2000
    assert stats.publish_retries > 0
    assert (stats.publish_failed, stats.publish_dropped, failures) == (0, 0, [])


async def test_publishes_through_a_server_restart_are_all_stored_once_in_order(
    nats_server: NatsServer,
) -> None:
    await create_stream(nats_server.port)
    async with running(nats_server) as (publisher, stats, _):

        async def restart() -> None:
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(nats_server.kill)
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(nats_server.start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart)
            await publish_paced(publisher, 1, 1500, rate=500)
        await settled(publisher, timeout=30)
    assert await stored(nats_server.port) == list(range(1, 1501))
    assert stats.publish_failed == stats.publish_dropped == 0


async def test_a_publish_past_its_bound_is_dropped_counted_and_logged(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    await create_stream(nats_server.port)
    await elect(nats_server.port, away=True)
    with caplog.at_level(logging.WARNING, logger="odin"):
        async with running(nats_server, retry_for=1.0) as (publisher, stats, _):
            for n in range(1, 21):
                publish(publisher, n)
            await wait_until(lambda: stats.publish_dropped == 20, timeout=10)
            await settled(publisher)
            assert stats.publish_failed == 20
            assert stats.publish_retrying == 0
            # Publishing goes on once the stream is back.
            await elect(nats_server.port, away=False)
            for n in range(21, 31):
                publish(publisher, n)
            await settled(publisher)
            await trio.sleep(1.1)  # the next log line would be due: there is none
    assert await stored(nats_server.port) == list(range(21, 31))
    lines = [r for r in caplog.records if r.getMessage() == "publish_dropped"]
    assert 1 <= len(lines) <= 2  # at most one a second, with the count
    assert sum(r.__dict__["odin_fields"]["count"] for r in lines) == 20


async def test_the_buffer_is_bounded_while_retrying_and_refusals_are_counted(
    nats_server: NatsServer,
) -> None:
    async with running(nats_server, capacity=50) as (publisher, stats, _):
        for n in range(1, 51):  # no stream yet: every one is answered 503 and waits
            publish(publisher, n)
        await wait_until(lambda: stats.publish_retrying == 50)
        with pytest.raises(BrokerError):
            publish(publisher, 51)
        assert stats.publish_failed == 1
        assert publisher.in_flight == 50
        await create_stream(nats_server.port)
        await settled(publisher)
    assert await stored(nats_server.port) == list(range(1, 51))
    assert stats.published == 50
    assert (stats.publish_failed, stats.publish_dropped) == (1, 0)


async def test_fresh_publishes_wait_behind_a_retry(nats_server: NatsServer) -> None:
    """While the oldest publishes are retried, newer ones are not written past them."""
    await create_stream(nats_server.port)
    await elect(nats_server.port, away=True)
    async with running(nats_server) as (publisher, stats, _):
        for n in range(1, 11):
            publish(publisher, n)
        await wait_until(lambda: stats.publish_retrying == 10)
        for n in range(11, 21):  # queued, not written: the queue pauses
            publish(publisher, n)
        await trio.sleep(0.3)
        assert stats.publish_retrying == 10 and publisher.in_flight == 20
        await elect(nats_server.port, away=False)
        await settled(publisher)
    assert await stored(nats_server.port) == list(range(1, 21))

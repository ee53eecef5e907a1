"""Recovery with JetStream as the history: beyond the server's window, across Odin processes
and restarts, and with many clients at once."""

from __future__ import annotations

import pytest
import trio

from tests.e2e.process import odin_process, port_of
from tests.helpers import checkpoint_chain, open_client, sample
from tests.nats.support import (
    NatsServer,
    RawPublisher,
    nats_config,
    odin_on_nats,
    odin_url_args,
)

pytestmark = [pytest.mark.trio, pytest.mark.slow]


async def publish(port: int, channel: str, count: int, start: int = 0) -> None:
    publisher = await RawPublisher.connect(port)
    for n in range(start, start + count):
        await publisher.publish(f"odin.token.{channel}", {"n": n})
    await publisher.flush()
    await publisher.aclose()


async def test_recovery_beyond_the_window_reads_jetstream(nats_server: NatsServer) -> None:
    config = nats_config(nats_server.url, **{"history.max_messages": 3})
    async with odin_on_nats(config) as (harness, broker):
        await broker.wait_ready()
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"])
            await publish(nats_server.port, "BTC.trade", 5)
            seen = await client.events(5)
        await publish(nats_server.port, "BTC.trade", 15, start=5)  # missed while away
        position = {"epoch": broker.epoch, "seq": seen[-1]["seq"]}
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            assert ack["recovery"]["BTC.trade"] == {"recovered": True, "count": 15}
            missed = await client.events(15)
        metrics = harness.context.metrics
    assert [e["data"]["n"] for e in missed] == list(range(5, 20))
    assert checkpoint_chain(missed, {"BTC.trade": seen[-1]["seq"]}) == []
    assert sample(metrics.registry, "odin_history_reads_total", result="ok") >= 1


async def test_many_clients_recovering_one_channel_share_one_read(
    nats_server: NatsServer,
) -> None:
    config = nats_config(nats_server.url, **{"history.max_messages": 2})
    async with odin_on_nats(config) as (harness, broker):
        await broker.wait_ready()
        await publish(nats_server.port, "BTC.trade", 1)
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"])
        position = ack["positions"]["BTC.trade"]
        await publish(nats_server.port, "BTC.trade", 10, start=1)
        reads_before = broker.stats().history_reads
        results: list[list[int]] = []

        async def recover() -> None:
            async with harness.client() as client:
                reply = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
                assert reply["recovered"] is True
                results.append([e["data"]["n"] for e in await client.events(10)])

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(recover)
        reads = broker.stats().history_reads - reads_before
        shared = harness.sample("odin_history_reads_total", result="shared")
    assert results == [list(range(1, 11))] * 40
    assert reads < 40  # collapsed: far fewer JetStream reads than recoveries
    assert shared + reads >= 40


async def test_a_client_recovers_on_another_odin_process(nats_server: NatsServer) -> None:
    args = odin_url_args(nats_server.url)
    with odin_process(args) as first, odin_process(args) as second:
        port_a = port_of(first.wait_for("listening"))
        port_b = port_of(second.wait_for("listening"))
        first.wait_for("broker_ready")
        second.wait_for("broker_ready")
        async with open_client(port_a) as client:
            ack = await client.subscribe(["BTC.trade", "ETH.trade"])
            await publish(nats_server.port, "BTC.trade", 4)
            await publish(nats_server.port, "ETH.trade", 4)
            seen = await client.events(8)
        await publish(nats_server.port, "BTC.trade", 6, start=4)
        last = {e["channel"]: e["seq"] for e in seen}
        recover = {ch: {"epoch": seen[0]["epoch"], "seq": seq} for ch, seq in last.items()}
        async with open_client(port_b) as client:
            ack = await client.subscribe(["BTC.trade", "ETH.trade"], recover=recover)
            assert ack["recovered"] is True
            assert ack["recovery"]["BTC.trade"]["count"] == 6
            assert ack["recovery"]["ETH.trade"]["count"] == 0
            missed = await client.events(6)
            await publish(nats_server.port, "ETH.trade", 1, start=4)
            (live,) = await client.events(1)
    assert [e["data"]["n"] for e in missed] == list(range(4, 10))
    assert checkpoint_chain([*missed, live], dict(last)) == []


async def test_a_client_recovers_after_odin_restarts(nats_server: NatsServer) -> None:
    args = odin_url_args(nats_server.url)
    with odin_process(args) as odin:
        port = port_of(odin.wait_for("listening"))
        odin.wait_for("broker_ready")
        async with open_client(port) as client:
            await client.subscribe(["SOL.trade"])
            await publish(nats_server.port, "SOL.trade", 3)
            seen = await client.events(3)
    await publish(nats_server.port, "SOL.trade", 5, start=3)  # no Odin running
    position = {"epoch": seen[-1]["epoch"], "seq": seen[-1]["seq"]}
    with odin_process(args) as odin:
        port = port_of(odin.wait_for("listening"))
        odin.wait_for("broker_ready")
        async with open_client(port) as client:
            ack = await client.subscribe(["SOL.trade"], recover={"SOL.trade": position})
            assert ack["recovery"]["SOL.trade"] == {"recovered": True, "count": 5}
            missed = await client.events(5)
    assert [e["data"]["n"] for e in missed] == [3, 4, 5, 6, 7]
    assert checkpoint_chain(missed, {"SOL.trade": position["seq"]}) == []

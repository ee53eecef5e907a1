"""The server takes from its broker only what its clients subscribe to, and positions stay
exact across a channel's interest coming and going (the in-memory twin, which feeds only what
is wanted, like the NATS broker)."""

from __future__ import annotations

import pytest

from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.config import Config
from odin_fanout.protocol.channels import Filters
from tests.helpers import make_broker, make_config, running_server
from tests.nats.support import wait_until

pytestmark = pytest.mark.trio


def fed(broker: MemoryBroker) -> Filters:
    """What the server last asked the broker to feed it."""
    return broker.filters


def twin(**overrides: object) -> tuple[Config, MemoryBroker]:
    config = make_config(**overrides)
    return config, make_broker(config, interest=True)


async def test_only_subscribed_channels_are_taken_and_positions_stay_exact() -> None:
    config, broker = twin(**{"broker.interest_linger": 0})
    async with running_server(config, broker, memory=True) as harness:
        window = harness.context.reader.window
        async with harness.client() as btc, harness.client() as eth:
            await btc.subscribe(["BTC.trade"])
            # The ack comes once the broker feeds the channel.
            assert fed(broker) == frozenset({"BTC.trade"})
            for n in range(5):
                harness.publish("BTC.trade", {"n": n})
                last_eth = harness.publish("ETH.trade", {"n": n})
            assert [e["data"]["n"] for e in await btc.events(5)] == list(range(5))
            assert harness.server.fanout.received == 5  # ETH was never fed
            assert not window.knows("ETH.trade")

            ack = await eth.subscribe(["ETH.trade"])
            assert fed(broker) == frozenset({"BTC.trade", "ETH.trade"})
            assert ack["positions"]["ETH.trade"]["seq"] == last_eth  # from the broker
            seq = harness.publish("ETH.trade", {"n": 5})
            (event,) = await eth.events(1)
            assert (event["seq"], event["prev"]) == (seq, last_eth)

            # Its last subscriber leaves: no longer fed, and forgotten by the window.
            await eth.request(
                {"type": "unsubscribe", "data": {"channels": ["ETH.trade"]}}, "unsubscription_ack"
            )
            await wait_until(lambda: fed(broker) == frozenset({"BTC.trade"}))
            assert not window.knows("ETH.trade")
            for n in range(6, 9):
                last_eth = harness.publish("ETH.trade", {"n": n})
            harness.publish("BTC.trade", {"n": 5})
            await btc.events(1)
            assert not window.knows("ETH.trade")  # what was published meanwhile never came

            # Wanted again: the position is the broker's, not what the window once held.
            ack = await eth.subscribe(["ETH.trade"])
            assert ack["positions"]["ETH.trade"]["seq"] == last_eth
            seq = harness.publish("ETH.trade", {"n": 9})
            (event,) = await eth.events(1)
            assert (event["seq"], event["prev"]) == (seq, last_eth)


async def test_a_client_recovers_a_channel_this_process_was_not_taking() -> None:
    config, broker = twin()
    async with running_server(config, broker, memory=True) as harness:
        published = [harness.publish("SOL.trade", {"n": n}) for n in range(6)]
        async with harness.client() as client:
            ack = await client.subscribe(
                ["SOL.trade"], recover={"SOL.trade": {"epoch": broker.epoch, "seq": published[1]}}
            )
            assert ack["recovery"]["SOL.trade"]["recovered"] is True
            replayed = await client.events(4)
            assert [e["seq"] for e in replayed] == published[2:]
            assert replayed[0]["prev"] == published[1]
            seq = harness.publish("SOL.trade", {"n": 6})
            (live,) = await client.events(1)
            assert (live["seq"], live["prev"]) == (seq, published[-1])


async def test_patterns_and_lingering_keys() -> None:
    config, broker = twin(**{"broker.interest_linger": 60})
    async with running_server(config, broker, memory=True) as harness:
        async with harness.client() as client:
            await client.subscribe(["BTC.*", "BTC.trade", "ETH.trade"])
            assert fed(broker) == frozenset({"BTC.*", "ETH.trade"})
            await client.request(
                {"type": "unsubscribe", "data": {"channels": ["ETH.trade"]}}, "unsubscription_ack"
            )
            await client.subscribe(["SOL.trade"])
            assert fed(broker) == frozenset({"BTC.*", "ETH.trade", "SOL.trade"})  # ETH lingers
            await client.subscribe(["*.*"])
            assert fed(broker) is None  # everything
        registry = harness.context.metrics.registry
        assert registry.get_sample_value("odin_interest_filters") == -1


async def test_a_process_configured_for_everything_never_narrows() -> None:
    config, broker = twin(**{"broker.interest": "all"})
    async with running_server(config, broker, memory=True) as harness:
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            harness.publish("ETH.trade", {"n": 0})
            harness.publish("BTC.trade", {"n": 1})
            await client.events(1)
        assert (fed(broker), broker.wants) == (None, 0)
        assert harness.context.reader.window.knows("ETH.trade")

"""Subscribers get the events of their channels, in publish order, and nothing else."""

from __future__ import annotations

import pytest
import trio

from tests.helpers import checkpoint_chain, running_server

pytestmark = pytest.mark.trio


async def test_events_arrive_in_publish_order_only_for_subscribed_channels() -> None:
    async with running_server() as harness, harness.client() as btc, harness.client() as eth:
        ack = await btc.subscribe(["BTC.trade"])
        assert ack["subscribed"] == ["BTC.trade"]
        assert ack["count"] == 1
        await eth.subscribe(["ETH.trade"])
        published: dict[str, list[int]] = {"BTC.trade": [], "ETH.trade": [], "SOL.trade": []}
        for i in range(60):
            channel = ("BTC.trade", "ETH.trade", "SOL.trade")[i % 3]
            published[channel].append(harness.publish(channel, {"n": i, "channel": channel}))
        btc_events = await btc.events(20)
        eth_events = await eth.events(20)
        assert [e["seq"] for e in btc_events] == published["BTC.trade"]
        assert [e["seq"] for e in eth_events] == published["ETH.trade"]
        assert {e["channel"] for e in btc_events} == {"BTC.trade"}
        assert checkpoint_chain(btc_events, {}) == []
        # Nothing else is pending for the BTC client: the next message is our pong.
        assert (await btc.request({"type": "heartbeat"}, "pong"))["type"] == "pong"


async def test_wildcards_deliver_each_matching_event_once() -> None:
    async with running_server() as harness, harness.client() as client:
        await client.subscribe(["BTC.*", "*.trade", "BTC.trade"])
        seqs = [
            harness.publish("BTC.trade", {"a": 1}),  # matches all three keys: delivered once
            harness.publish("BTC.liquidity", {"a": 2}),
            harness.publish("ETH.trade", {"a": 3}),
            harness.publish("ETH.social", {"a": 4}),  # matches none
            harness.publish("SOL.trade", {"a": 5}),
        ]
        events = await client.events(4)
        assert [e["seq"] for e in events] == [seqs[0], seqs[1], seqs[2], seqs[4]]
        assert [e["channel"] for e in events] == [
            "BTC.trade",
            "BTC.liquidity",
            "ETH.trade",
            "SOL.trade",
        ]
        assert (await client.request({"type": "heartbeat"}, "pong"))["type"] == "pong"


async def test_envelope_carries_positions_and_the_payload_verbatim() -> None:
    async with running_server() as harness, harness.client() as client:
        await client.subscribe(["BTC.trade", "BTC.social"])
        first = harness.publish("BTC.trade", {"type": "price:update", "price": 1.5})
        second = harness.publish("BTC.social", {"commentCount": 3})
        third = harness.publish("BTC.trade", {"type": "price:update", "price": 1.6})
        events = await client.events(3)
        epoch = harness.broker.epoch
        assert events[0] == {
            "type": "price:update",
            "channel": "BTC.trade",
            "seq": first,
            "prev": 0,
            "epoch": epoch,
            "ts": events[0]["ts"],
            "data": {"type": "price:update", "price": 1.5},
        }
        # A payload without its own type is typed by the channel's event.
        assert events[1]["type"] == "social:update"
        assert events[1]["prev"] == 0 and events[1]["seq"] == second
        assert events[2]["prev"] == first and events[2]["seq"] == third


async def test_unsubscribe_stops_delivery() -> None:
    async with running_server() as harness, harness.client() as client:
        await client.subscribe(["BTC.trade", "ETH.trade"])
        ack = await client.request(
            {"type": "unsubscribe", "data": {"channels": ["BTC.trade"]}}, "unsubscription_ack"
        )
        assert ack == {"type": "unsubscription_ack", "unsubscribed": ["BTC.trade"], "count": 1}
        harness.publish("BTC.trade", {"a": 1})
        eth = harness.publish("ETH.trade", {"a": 2})
        assert [e["seq"] for e in await client.events(1)] == [eth]


async def test_many_subscribers_all_receive_everything() -> None:
    async with running_server() as harness:
        async with trio.open_nursery() as nursery:
            received: dict[int, list[int]] = {}
            ready = trio.Semaphore(0)
            go = trio.Event()

            async def subscriber(index: int) -> None:
                async with harness.client() as client:
                    await client.subscribe(["*.trade"])
                    ready.release()
                    await go.wait()
                    received[index] = [e["seq"] for e in await client.events(200, timeout=20)]

            for index in range(20):
                nursery.start_soon(subscriber, index)
            for _ in range(20):
                await ready.acquire()
            published = [harness.publish(f"T{i % 7}.trade", {"i": i}) for i in range(200)]
            go.set()
        assert all(seqs == published for seqs in received.values())
        assert len(received) == 20


async def test_a_payload_that_is_not_json_becomes_a_gap_notice() -> None:
    from tests.helpers import capture_logs

    with capture_logs() as logs:
        async with running_server() as harness, harness.client() as client:
            await client.subscribe(["BTC.trade"])
            good = harness.publish("BTC.trade", {"n": 1})
            bad = [harness.publish("BTC.trade", b"not json {") for _ in range(3)]
            after = harness.publish("BTC.trade", {"n": 2})
            received = [await client.recv() for _ in range(5)]
    assert [m["type"] for m in received] == ["trade:update", "gap", "gap", "gap", "trade:update"]
    assert received[0]["seq"] == good
    assert [(m["from"], m["to"], m["reason"]) for m in received[1:4]] == [
        (seq, seq, "invalid_payload") for seq in bad
    ]
    assert (received[4]["seq"], received[4]["prev"]) == (after, bad[-1])
    assert [entry["event"] for entry in logs].count("invalid_payload") == 1


async def test_feed_overflow_is_announced_as_a_gap_and_the_stream_stays_linked() -> None:
    from tests.helpers import make_broker, make_config

    config = make_config(**{"broker.feed_capacity": 16})
    async with running_server(config, make_broker(config)) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        # Published without yielding: the fan-out cannot take more than the feed holds.
        seqs = [harness.publish("BTC.trade", {"n": n}) for n in range(100)]
        # The feed holds 16 (plus one handed straight to a waiting fan-out).
        taken = 100 - harness.broker.feed_stats.dropped
        assert taken in (16, 17)
        await harness.settle(upto=seqs[taken - 1])
        last = harness.publish("BTC.trade", {"n": 100})
        received: list[dict[str, object]] = []
        while not received or received[-1].get("seq") != last:
            received.append(await client.recv())
    events = [m for m in received if "seq" in m]
    (gap,) = [m for m in received if m["type"] == "gap"]
    assert [e["seq"] for e in events] == [*seqs[:taken], last]
    assert (gap["from"], gap["to"], gap["reason"]) == (seqs[taken], seqs[-1], "feed_overflow")
    assert events[-1]["prev"] == gap["to"]
    assert harness.sample("odin_gaps_total", reason="feed_overflow") == 1


async def test_a_feed_overflow_after_a_message_the_feed_never_had_announces_both() -> None:
    from tests.helpers import make_broker, make_config

    config = make_config(**{"broker.feed_capacity": 16})
    async with running_server(config, make_broker(config)) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        first = harness.publish("BTC.trade", {"n": 0})
        await harness.settle(upto=first)
        # Another channel fills the feed; then a message the feed never had (lost before
        # it), then the ones it drops for want of room.
        fill = [harness.publish("ETH.trade", {"n": n}) for n in range(40)]
        unseen = harness.broker.publish_nowait("BTC.trade", b'{"n": 1}', feed=False).seq
        dropped = [harness.publish("BTC.trade", {"n": n}) for n in range(2, 6)]
        taken = len(fill) - (harness.broker.feed_stats.dropped - len(dropped))
        await harness.settle(upto=fill[taken - 1])  # room again: the feed's gap comes next
        last = harness.publish("BTC.trade", {"n": 6})
        received: list[dict[str, object]] = []
        with trio.fail_after(5):
            while not received or received[-1].get("seq") != last:
                received.append(await client.recv())
    gaps = [(m["from"], m["to"], m["reason"]) for m in received if m["type"] == "gap"]
    # From right after what the client has: the position the feed never had included.
    assert gaps == [(first + 1, dropped[-1], "feed_overflow")]
    assert first < unseen < dropped[0]
    assert [m["seq"] for m in received if "seq" in m] == [first, last]

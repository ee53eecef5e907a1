"""A client that reconnects with its positions gets exactly what it missed, or is told plainly
that it cannot and is handed the latest value."""

from __future__ import annotations

import random

import pytest
import trio

from odin_fanout.broker.base import BrokerError, HistoryPage
from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.protocol.publication import Publication
from tests.helpers import (
    Message,
    capture_logs,
    checkpoint_chain,
    make_broker,
    make_config,
    running_server,
)

pytestmark = pytest.mark.trio

CHANNELS = ["BTC.trade", "ETH.trade", "SOL.liquidity"]


class SlowHistoryBroker(MemoryBroker):
    """A memory broker whose history reads take a while, as a remote one does: live messages
    keep arriving while a recovery reads, which exercises the seam."""

    reads = 0

    def __init__(self, *, max_messages: int, max_age: float, max_channels: int) -> None:
        super().__init__(max_messages=max_messages, max_age=max_age, max_channels=max_channels)
        self.reading = trio.Event()
        """Set once a read has its page and is still on its way (the slow part)."""

    async def read_after(self, channel: str, after: int, limit: int) -> HistoryPage:
        self.reads += 1
        page = await super().read_after(channel, after, limit)
        self.reading.set()
        await trio.sleep(0.05)  # the latency of a remote broker's read: kept, it is the point
        return page


async def publish_continuously(harness, stop: trio.Event, published: dict[str, list[int]]):
    rng = random.Random(7)
    n = 0
    while not stop.is_set():
        channel = rng.choice(CHANNELS)
        published[channel].append(harness.publish(channel, {"n": n}))
        n += 1
        await trio.sleep(0.001)


async def published_more(published: dict[str, list[int]], count: int) -> None:
    """Wait until ``publish_continuously`` has published ``count`` more. It offers no event
    (it paces itself with a sleep): polled, bounded."""
    target = sum(map(len, published.values())) + count
    with trio.fail_after(10):
        while sum(map(len, published.values())) < target:
            await trio.sleep(0.001)


def positions(events: list[Message], epoch: str) -> dict[str, dict[str, object]]:
    last: dict[str, int] = {}
    for event in events:
        last[event["channel"]] = event["seq"]
    return {channel: {"epoch": epoch, "seq": seq} for channel, seq in last.items()}


@pytest.mark.parametrize("window", [1000, 5], ids=["from-window", "from-broker"])
async def test_reconnect_with_positions_recovers_exactly_what_was_missed(window: int) -> None:
    # With a window of 5 the server's own history is too short, so recovery reads the broker
    # (slowly) while publishing goes on: the seam between replay and live is exercised.
    config = make_config(**{"history.max_messages": window})
    broker = SlowHistoryBroker(max_messages=10_000, max_age=300, max_channels=100)
    published: dict[str, list[int]] = {channel: [] for channel in CHANNELS}
    received: list[Message] = []
    async with running_server(config, broker) as harness:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            async with harness.client() as client:
                ack = await client.subscribe(CHANNELS)
                start = {ch: ack["positions"][ch]["seq"] for ch in CHANNELS}
                nursery.start_soon(publish_continuously, harness, stop, published)
                received += await client.events(60)
            # Disconnected: publishing goes on (50 more publications the client misses).
            await published_more(published, 50)
            recover = {ch: {"epoch": broker.epoch, "seq": start[ch]} for ch in CHANNELS}
            recover.update(positions(received, broker.epoch))
            async with harness.client() as client:
                ack = await client.subscribe(CHANNELS, recover=recover)
                assert ack["recovered"] is True, ack
                assert all(report["recovered"] for report in ack["recovery"].values())
                missed = sum(report["count"] for report in ack["recovery"].values())
                assert missed > 0
                received += await client.events(missed + 60, timeout=10)
                stop.set()
                # Drain whatever is still in flight, then compare with what was published.
                target = {ch: published[ch][-1] for ch in CHANNELS if published[ch]}
                last = {}
                for event in received:
                    last[event["channel"]] = event["seq"]
                with trio.fail_after(5):
                    while any(last.get(ch, 0) < seq for ch, seq in target.items()):
                        event = (await client.events(1))[0]
                        received.append(event)
                        last[event["channel"]] = event["seq"]
    for channel in CHANNELS:
        got = [e["seq"] for e in received if e["channel"] == channel]
        want = [seq for seq in published[channel] if seq > start[channel]]
        assert got == want, (
            f"{channel}: missing {set(want) - set(got)}, extra {len(got) - len(want)}"
        )
    assert checkpoint_chain(received, {}) == []
    if window == 5:
        assert broker.reads > 0


async def test_position_from_the_ack_recovers_a_quiet_channel() -> None:
    async with running_server() as harness:
        harness.publish("BTC.trade", {"n": 0})
        await harness.settle()
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"])
        position = ack["positions"]["BTC.trade"]
        missed = [harness.publish("BTC.trade", {"n": n}) for n in range(1, 4)]
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            assert ack["recovery"]["BTC.trade"] == {"recovered": True, "count": 3}
            assert [e["seq"] for e in await client.events(3)] == missed


async def test_recovery_under_a_pattern_subscription() -> None:
    async with running_server() as harness:
        first = harness.publish("BTC.trade", {"n": 0})
        missed = [harness.publish("BTC.trade", {"n": 1}), harness.publish("BTC.trade", {"n": 2})]
        other = harness.publish("BTC.social", {"n": 3})
        await harness.settle()
        async with harness.client() as client:
            ack = await client.subscribe(
                ["BTC.*"], recover={"BTC.trade": {"epoch": harness.broker.epoch, "seq": first}}
            )
            assert ack["recovered"] is True
            live = harness.publish("BTC.social", {"n": 4})
            events = await client.events(3)
            # Replay first, then live; BTC.social had no position, so its past is not replayed.
            assert [e["seq"] for e in events] == [*missed, live]
            assert other not in [e["seq"] for e in events]


async def test_epoch_change_is_not_recovered_and_the_latest_value_is_sent() -> None:
    async with running_server() as harness:
        old = harness.publish("BTC.trade", {"n": 0})
        old_epoch = harness.broker.epoch
        harness.broker.lose_history()
        latest = harness.publish("BTC.trade", {"n": 1, "price": 42})
        await harness.settle()
        async with harness.client() as client:
            ack = await client.subscribe(
                ["BTC.trade"], recover={"BTC.trade": {"epoch": old_epoch, "seq": old}}
            )
            assert ack["recovered"] is False
            assert ack["recovery"]["BTC.trade"] == {
                "recovered": False,
                "count": 0,
                "reason": "epoch_changed",
            }
            assert ack["positions"]["BTC.trade"] == {"epoch": harness.broker.epoch, "seq": latest}
            (event,) = await client.events(1)
            assert event["seq"] == latest
            assert event["epoch"] == harness.broker.epoch != old_epoch
            assert event["data"] == {"n": 1, "price": 42}


async def test_position_older_than_the_history_is_not_recovered() -> None:
    config = make_config(**{"history.max_messages": 5})
    async with running_server(config, make_broker(config)) as harness:
        first = harness.publish("BTC.trade", {"n": 0})
        sent = [harness.publish("BTC.trade", {"n": n}) for n in range(1, 21)]
        await harness.settle()
        async with harness.client() as client:
            ack = await client.subscribe(
                ["BTC.trade"], recover={"BTC.trade": {"epoch": harness.broker.epoch, "seq": first}}
            )
            assert ack["recovery"]["BTC.trade"]["reason"] == "history_expired"
            assert ack["recovered"] is False
            (event,) = await client.events(1)
            assert event["seq"] == sent[-1]
            # Nothing partial was replayed: the next message is live.
            live = harness.publish("BTC.trade", {"n": 99})
            (event,) = await client.events(1)
            assert (event["seq"], event["prev"]) == (live, sent[-1])


async def test_more_missed_than_the_recovery_limit_is_not_recovered() -> None:
    config = make_config(**{"history.recovery_max_messages": 10})
    async with running_server(config) as harness:
        first = harness.publish("BTC.trade", {"n": 0})
        sent = [harness.publish("BTC.trade", {"n": n}) for n in range(1, 30)]
        await harness.settle()
        async with harness.client() as client:
            ack = await client.subscribe(
                ["BTC.trade"], recover={"BTC.trade": {"epoch": harness.broker.epoch, "seq": first}}
            )
            assert ack["recovery"]["BTC.trade"]["reason"] == "limit_exceeded"
            assert [e["seq"] for e in await client.events(1)] == [sent[-1]]


async def test_position_ahead_of_the_history_is_refused() -> None:
    async with running_server() as harness:
        latest = harness.publish("BTC.trade", {"n": 0})
        await harness.settle()
        async with harness.client() as client:
            ack = await client.subscribe(
                ["BTC.trade"],
                recover={"BTC.trade": {"epoch": harness.broker.epoch, "seq": latest + 100}},
            )
            assert ack["recovery"]["BTC.trade"]["reason"] == "unknown_position"
            assert [e["seq"] for e in await client.events(1)] == [latest]


async def test_recovering_an_unknown_channel_of_this_epoch_from_zero() -> None:
    async with running_server() as harness, harness.client() as client:
        ack = await client.subscribe(
            ["BTC.trade"], recover={"BTC.trade": {"epoch": harness.broker.epoch, "seq": 0}}
        )
        assert ack["recovery"]["BTC.trade"] == {"recovered": True, "count": 0}
        live = harness.publish("BTC.trade", {"n": 1})
        assert [e["seq"] for e in await client.events(1)] == [live]


async def test_invalid_recover_requests_get_an_error_and_change_nothing() -> None:
    async with running_server() as harness, harness.client() as client:
        epoch = harness.broker.epoch
        cases = [
            ({"BTC.*": {"epoch": epoch, "seq": 1}}, "cannot recover a pattern"),
            ({"ETH.trade": {"epoch": epoch, "seq": 1}}, "not among the channels"),
            ({"BTC.trade": {"epoch": epoch, "seq": -1}}, "seq must be >= 0"),
        ]
        for recover, text in cases:
            reply = await client.subscribe(["BTC.*"], recover=recover)
            assert reply["type"] == "error"
            assert reply["code"] == "INVALID_POSITION"
            assert text in reply["message"]
        reply = await client.request(
            {"type": "subscribe", "data": {"channels": ["BTC.trade"], "recover": {"BTC.trade": 5}}},
            "subscription_ack",
        )
        assert reply["code"] == "INVALID_MESSAGE"
        ack = await client.subscribe(["ETH.trade"])
        assert ack["count"] == 1


async def test_live_messages_published_during_a_slow_read_are_not_lost() -> None:
    config = make_config(**{"history.max_messages": 2})
    broker = SlowHistoryBroker(max_messages=1000, max_age=300, max_channels=100)
    async with running_server(config, broker) as harness:
        first = harness.publish("BTC.trade", {"n": 0})
        missed = [harness.publish("BTC.trade", {"n": n}) for n in range(1, 6)]
        async with harness.client() as client, trio.open_nursery() as nursery:
            during: list[int] = []

            async def publish_during_read() -> None:
                await broker.reading.wait()
                during.extend(harness.publish("BTC.trade", {"n": 10 + n}) for n in range(3))

            nursery.start_soon(publish_during_read)
            ack = await client.subscribe(
                ["BTC.trade"], recover={"BTC.trade": {"epoch": broker.epoch, "seq": first}}
            )
            assert ack["recovery"]["BTC.trade"]["recovered"] is True
            events = await client.events(len(missed) + 3)
            assert [e["seq"] for e in events] == missed + during
            assert checkpoint_chain(events, {"BTC.trade": first}) == []


async def test_a_window_over_its_byte_bound_still_recovers_exactly_through_the_broker() -> None:
    # 1 MiB holds about 60 of these (8 KB bodies: frame and body count, ~17 KB an event).
    config = make_config(**{"history.max_bytes": 1024 * 1024})
    body = {"pad": "x" * 8000}
    with capture_logs() as logs:
        async with running_server(config) as harness:
            harness.publish("BTC.trade", body)
            await harness.settle()
            async with harness.client() as client:
                ack = await client.subscribe(["BTC.trade"])
            position = ack["positions"]["BTC.trade"]
            missed = [harness.publish("BTC.trade", body) for _ in range(40)]
            # Busier channels push the window over its bound: BTC.trade, the least recently
            # published, loses its oldest messages first.
            for _ in range(40):
                harness.publish("ETH.trade", body)
                harness.publish("SOL.trade", body)
            await harness.settle()
            reader = harness.server.context.reader
            window = reader.window
            assert window.bytes <= config.history.max_bytes
            assert window.stats.messages_evicted > 0
            assert [e.seq for e in window.after("BTC.trade", position["seq"], 100, 0.0)] != missed
            assert window.last_seq("BTC.trade") == missed[-1]
            reads = harness.sample("odin_history_reads_total", result="ok")
            async with harness.client() as client:
                ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
                assert ack["recovery"]["BTC.trade"] == {"recovered": True, "count": 40}
                events = await client.events(40)
                assert [e["seq"] for e in events] == missed
                # Linked, from the position on: nothing lost, nothing twice.
                assert [e["prev"] for e in events] == [position["seq"], *missed[:-1]]
            assert harness.sample("odin_history_reads_total", result="ok") > reads
            reader.flush_metrics()
            evicted = harness.sample("odin_history_evicted_total", reason="max_bytes")
            assert evicted == window.stats.messages_evicted
            assert harness.sample("odin_history_bytes") == window.bytes
            # A recovery whose messages are all still in the window needs no broker read.
            tail = window.after("SOL.trade", 0, 1000, 0.0)
            assert len(tail) >= 2
            reads = harness.sample("odin_history_reads_total", result="ok")
            async with harness.client() as client:
                since = {"epoch": harness.broker.epoch, "seq": tail[0].seq}
                ack = await client.subscribe(["SOL.trade"], recover={"SOL.trade": since})
                assert ack["recovery"]["SOL.trade"] == {"recovered": True, "count": len(tail) - 1}
            assert harness.sample("odin_history_reads_total", result="ok") == reads
    warned = [log for log in logs if log["event"] == "history_bytes_evicting"]
    assert len(warned) == 1
    assert warned[0]["max_bytes"] == 1024 * 1024


class OutageBroker(MemoryBroker):
    """A memory broker whose history cannot be read while ``down`` (the NATS connection this
    process reads through is lost), while publishers go on through another."""

    down = False

    async def read_after(self, channel: str, after: int, limit: int) -> HistoryPage:
        if self.down:
            raise BrokerError("history reads are not connected")
        return await super().read_after(channel, after, limit)

    async def latest(self, channel: str) -> Publication | None:
        if self.down:
            raise BrokerError("history reads are not connected")
        return await super().latest(channel)


async def test_a_recovery_the_broker_cannot_answer_keeps_the_position_and_announces_the_rest() -> (
    None
):
    # A client comes from another instance with a position on a channel this process has
    # never been fed, while this process cannot read the history: it cannot be recovered, no
    # latest value can be had, and the client must still hear of every message it misses.
    broker = OutageBroker(max_messages=1000, max_age=300, max_channels=100)
    async with running_server(make_config(), broker) as harness:
        first = broker.publish_nowait("BTC.trade", b'{"n": 0}', feed=False).seq
        lost = [broker.publish_nowait("BTC.trade", b'{"n": 1}', feed=False).seq]
        broker.down = True
        async with harness.client() as client:
            position = {"epoch": broker.epoch, "seq": first}
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            assert ack["recovery"]["BTC.trade"] == {
                "recovered": False,
                "count": 0,
                "reason": "broker_unavailable",
            }
            # Not moved back to 0, not moved on past what it has not got.
            assert ack["positions"]["BTC.trade"] == position
            broker.down = False
            lost.append(broker.publish_nowait("BTC.trade", b'{"n": 2}', feed=False).seq)
            live = harness.publish("BTC.trade", {"n": 3})
            gap = await client.expect("gap")
            assert (gap["from"], gap["to"]) == (first + 1, lost[-1])
            (event,) = await client.events(1)
            assert (event["seq"], event["prev"]) == (live, lost[-1])


async def test_a_latest_value_older_than_the_clients_position_is_not_sent() -> None:
    broker = OutageBroker(max_messages=1000, max_age=300, max_channels=100)
    async with running_server(make_config(), broker) as harness:
        known = harness.publish("BTC.trade", {"n": 0})
        await harness.settle()
        # The client came from an instance further on: this one's feed lost the next message.
        ahead = broker.publish_nowait("BTC.trade", b'{"n": 1}', feed=False).seq
        broker.down = True
        async with harness.client() as client:
            position = {"epoch": broker.epoch, "seq": ahead}
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            assert ack["recovery"]["BTC.trade"]["reason"] == "broker_unavailable"
            # Not sent back to the window's latest value, which it had before.
            assert ack["positions"]["BTC.trade"] == position
            broker.down = False
            live = harness.publish("BTC.trade", {"n": 2})
            (event,) = await client.events(1)
            assert (event["seq"], event["prev"]) == (live, ahead)
            assert known < ahead


class LateLatestBroker(MemoryBroker):
    """A memory broker whose ``latest`` answer is held until released: the history can be
    replaced (a new epoch) between the read and the subscribe's ack."""

    def __init__(self) -> None:
        super().__init__(max_messages=1000, max_age=300, max_channels=100)
        self.answered = trio.Event()
        self.release = trio.Event()

    async def latest(self, channel: str) -> Publication | None:
        found = await super().latest(channel)
        self.answered.set()
        await self.release.wait()
        return found


async def test_a_new_channels_position_read_in_a_replaced_history_is_not_given() -> None:
    broker = LateLatestBroker()
    async with running_server(make_config(), broker) as harness:
        harness.publish("ETH.trade", {"n": 0})
        await harness.settle()
        # A channel this process has never been fed: its position comes from the broker.
        broker.publish_nowait("BTC.trade", b'{"n": 1}', feed=False)
        async with harness.client() as client, trio.open_nursery() as nursery:
            acks: list[Message] = []

            async def subscribe() -> None:
                acks.append(await client.subscribe(["BTC.trade"]))

            nursery.start_soon(subscribe)
            with trio.fail_after(5):
                await broker.answered.wait()
            broker.lose_history()  # the answer on its way is the old history's
            harness.publish("ETH.trade", {"n": 2})
            await harness.settle()
            broker.release.set()
        (ack,) = acks
        # No position in the new history's numbering that only the old one had.
        assert "BTC.trade" not in ack.get("positions", {})

"""One client that stops reading never slows the others; it gets the policy's outcome, and
what the server holds for it stays within the configured bounds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from odin_fanout.config import Config
from odin_fanout.logs import get_logger
from odin_fanout.protocol.negotiation import SUBPROTOCOL_V1
from odin_fanout.server.app import OdinServer
from tests.helpers import (
    Harness,
    MemoryListener,
    Message,
    RawClient,
    make_broker,
    make_config,
    running_server,
)

pytestmark = pytest.mark.trio

PAYLOAD = "x" * 4000
QUEUE = {"connection.queue_max_messages": 32, "connection.queue_max_bytes": 65536}


async def publish_paced(
    harness, channels: list[str], count: int, readers: list[list[int]]
) -> list[int]:
    """Publish in batches of 8, each once the reading clients have the previous one: the
    readers share this process (and its one core) with the server, so without this they
    could be slow consumers themselves. The non-reading client is not waited for."""
    seqs: list[int] = []
    for n in range(count):
        seqs.append(harness.publish(channels[n % len(channels)], {"n": n, "pad": PAYLOAD}))
        if n % 8 == 7:
            with trio.fail_after(10):
                while any(len(received) - 1 < len(seqs) for received in readers):
                    await trio.sleep(0.001)  # the readers signal nothing: polled, bounded
    return seqs


async def read_everything(harness, channels: list[str], count: int, into: list[int]) -> None:
    async with harness.client() as client:
        await client.subscribe(channels)
        into.append(-1)  # subscribed
        for _ in range(count):
            into.extend(e["seq"] for e in await client.events(1, timeout=30))


async def test_slow_consumer_is_closed_and_others_get_everything() -> None:
    config = make_config(**QUEUE, **{"server.close_timeout": 10})
    async with running_server(config) as harness:
        slow = await RawClient.connect(harness.port)
        await slow.send_json({"type": "subscribe", "data": {"channels": ["BTC.trade"]}})
        fast: list[list[int]] = [[], [], []]
        async with trio.open_nursery() as nursery:
            for received in fast:
                nursery.start_soon(read_everything, harness, ["BTC.trade"], 400, received)
            with trio.fail_after(5):
                while (
                    not all(received for received in fast)
                    or len(harness.context.registry.connections) < 4
                ):
                    await trio.sleep(0.001)  # the readers signal nothing: polled, bounded
            published = await publish_paced(harness, ["BTC.trade"], 400, fast)
        for received in fast:
            assert received[1:] == published
        assert harness.sample("odin_slow_consumers_total", action="closed") == 1
        # The slow client now reads what reached it: events, then the 1008 close frame.
        messages = await slow.read_messages(lambda messages: False)
        assert messages[-1] == {"type": "<close>", "code": 1008, "reason": "slow consumer"}
        seqs = [m["seq"] for m in messages if "seq" in m]
        assert seqs == published[: len(seqs)]  # in order, a prefix, never reordered
        assert len(seqs) < len(published)
        slow.close()
        await harness.wait_connections(0)
        assert harness.sample("odin_connections_closed_total", reason="slow_consumer") == 1


async def test_conflate_policy_keeps_the_newest_per_channel_and_announces_gaps() -> None:
    config = make_config(**QUEUE, **{"connection.slow_consumer_policy": "conflate"})
    channels = ["BTC.trade", "ETH.trade"]
    async with running_server(config) as harness:
        slow = await RawClient.connect(harness.port)
        await slow.send_json({"type": "subscribe", "data": {"channels": channels}})
        fast: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_everything, harness, channels, 600, fast)
            with trio.fail_after(5):
                while not fast or len(harness.context.registry.connections) < 2:
                    await trio.sleep(0.001)
            published = await publish_paced(harness, channels, 600, [fast])
            port = slow.sock.getsockname()[1]
            (connection,) = [
                c
                for c in harness.context.registry.connections.values()
                if c.peer.endswith(f":{port}")
            ]
            # The server never held more than the bounds for the slow client.
            assert connection.writer.queued_messages <= 32
            assert connection.writer.queued_bytes <= 65536 + 8192
        assert fast[1:] == published
        assert harness.sample("odin_slow_consumers_total", action="conflated") >= 1
        assert harness.sample("odin_slow_consumers_total", action="closed") == 0

        # Catching up: for each channel, every event links to the last one seen or to a gap
        # notice covering what was dropped, and the newest event of each channel arrives.
        newest = {ch: max(s for i, s in enumerate(published) if channels[i % 2] == ch)
                  for ch in channels}  # fmt: skip
        last: dict[str, int] = {}

        def caught_up(messages: list) -> bool:
            return all(
                any(m.get("channel") == ch and m.get("seq") == newest[ch] for m in messages)
                for ch in channels
            )

        messages = await slow.read_messages(caught_up)
        gaps = 0
        for message in messages:
            assert message["type"] != "<close>"
            if message["type"] == "gap":
                assert message["reason"] == "conflated"
                assert message["from"] > last.get(message["channel"], 0)
                last[message["channel"]] = message["to"]
                gaps += 1
            elif "seq" in message:
                channel = message["channel"]
                if channel in last:
                    assert message["prev"] == last[channel], message
                last[channel] = message["seq"]
        assert gaps >= 1
        assert last == newest
        # Still connected: it can keep going.
        await slow.send_json({"type": "heartbeat"})
        replies = await slow.read_messages(lambda ms: any(m["type"] == "pong" for m in ms))
        assert replies[-1]["type"] == "pong"
        slow.close()


@pytest.mark.parametrize("memory", [False, True], ids=["socket", "memory-stream"])
async def test_an_event_larger_than_the_queue_limit_is_still_delivered(memory: bool) -> None:
    config = make_config(**{"connection.queue_max_bytes": 4096})
    async with running_server(config, memory=memory) as harness, harness.client() as client:
        await client.subscribe(["BTC.trade"])
        for n in range(3):  # one at a time: each alone is over the queue's byte limit
            seq = harness.publish("BTC.trade", {"n": n, "pad": "y" * 50_000})
            assert [e["seq"] for e in await client.events(1)] == [seq]
        assert harness.sample("odin_slow_consumers_total", action="closed") == 0


# ---- a client whose stream takes nothing until it reads (deterministic queues) ------------


@attrs.define(eq=False)
class LockstepListener(MemoryListener):
    """Connections whose server side's ``send_all`` returns only once the client has read:
    what the client does not read stays in the server's queue, frame for frame."""

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.lockstep_stream_pair()
        await self.queued.send(server)
        return client


@asynccontextmanager
async def lockstep_server(config: Config) -> AsyncIterator[Harness]:
    broker = make_broker(config)
    server = OdinServer(config, broker, log=get_logger(service="odin-test"))
    listener = LockstepListener.create()
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(
            lambda task_status: server.run(listeners=[listener], task_status=task_status)
        )
        yield Harness(server, broker, listening, nursery, listener)
        nursery.cancel_scope.cancel()


class LockstepClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: list[Message] = []
        self.read = 0
        """Messages already returned by ``read_until``."""

    @classmethod
    async def connect(cls, harness: Harness) -> LockstepClient:
        client = cls(await harness.open_stream())
        request = Request(host="odin", target="/ws", subprotocols=[SUBPROTOCOL_V1])
        await client.stream.send_all(client.ws.send(request))
        await client.read_until(lambda m: m["type"] == "hello")
        return client

    async def send(self, message: Message) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))

    async def read_until(self, done: Callable[[Message], bool]) -> list[Message]:
        """Read until a message for which ``done`` is true (or the close frame); the
        messages read since the last call."""
        start = self.read
        with trio.fail_after(5):
            while not any(done(m) or m["type"] == "<close>" for m in self.messages[start:]):
                self.ws.receive_data(bytes(await self.stream.receive_some()))
                for event in self.ws.events():
                    if isinstance(event, TextMessage):
                        assert event.message_finished  # the server's messages are small
                        self.messages.append(json.loads(event.data))
                    elif isinstance(event, CloseConnection):
                        self.messages.append({"type": "<close>", "code": event.code})
                    else:
                        assert isinstance(event, AcceptConnection)
        for n, message in enumerate(self.messages[start:], start):
            if done(message) or message["type"] == "<close>":
                self.read = n + 1
                return self.messages[start : n + 1]
        raise AssertionError("unreachable")


def assert_in_order(messages: list[Message], channel: str) -> None:
    """One channel whose every position is a message of it (the only one published): each
    notice starts right after what the client has, each event links to it."""
    last: int | None = None
    for message in messages:
        if message.get("channel") != channel:
            continue
        if message["type"] == "gap":
            assert last is None or message["from"] == last + 1, (message, messages)
            assert message["from"] <= message["to"], message
            last = message["to"]
        elif "seq" in message:
            assert last is None or message["prev"] == last, (message, messages)
            last = message["seq"]


def publish(harness: Harness, count: int, *, dark: bool = False) -> int:
    seq = 0
    for _ in range(count):
        body = json.dumps({"x": 1}).encode()
        seq = harness.broker.publish_nowait("BTC.trade", body, feed=not dark).seq
    return seq


async def settled() -> None:
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()


def events_of(messages: list[Message]) -> list[Any]:
    return [m["seq"] for m in messages if "seq" in m]


SMALL_QUEUE = {"connection.queue_max_messages": 8, "connection.queue_max_bytes": 1 << 20}


async def subscribed_and_stuck(harness: Harness) -> LockstepClient:
    """A client subscribed to BTC.trade that has one event on its way and reads no more."""
    client = await LockstepClient.connect(harness)
    await client.send({"type": "subscribe", "id": 1, "data": {"channels": ["BTC.trade"]}})
    await client.read_until(lambda m: m["type"] == "subscription_ack")
    publish(harness, 1)
    await settled()  # the writer waits in send_all with it: it is started
    return client


async def test_a_slow_consumer_closed_gets_no_notice_past_the_events_it_lost() -> None:
    config = make_config(**SMALL_QUEUE)
    async with lockstep_server(config) as harness:
        client = await subscribed_and_stuck(harness)
        publish(harness, 2)
        publish(harness, 1, dark=True)  # announced as missed before the next one
        publish(harness, 8)
        await settled()
        assert harness.sample("odin_slow_consumers_total", action="closed") == 1
        messages = await client.read_until(lambda m: False)
        assert messages[-1] == {"type": "<close>", "code": 1008}
        # Only the event that was on its way: the notice after the dropped ones went too.
        assert events_of(messages) == [1]
        assert not [m for m in messages if m["type"] == "gap"]
        assert_in_order(messages, "BTC.trade")
        assert harness.sample("odin_deliveries_dropped_total", reason="slow_consumer") == 6


async def test_events_dropped_at_another_close_are_counted_under_its_reason() -> None:
    """A connection closed with events still queued for another reason than slowness (here a
    message over the size limit): the events are counted under that reason, not as a slow
    consumer's."""
    config = make_config(**SMALL_QUEUE)
    async with lockstep_server(config) as harness:
        client = await subscribed_and_stuck(harness)
        publish(harness, 4)  # queued behind the one on its way: within the queue's bound
        await settled()
        await client.send({"type": "ping", "pad": "x" * 20_000})  # over the 16 KiB limit
        messages = await client.read_until(lambda m: False)
        assert messages[-1] == {"type": "<close>", "code": 1009}
        assert events_of(messages) == [1]
        assert harness.sample("odin_deliveries_dropped_total", reason="message_too_big") == 4
        assert harness.sample("odin_deliveries_dropped_total", reason="slow_consumer") == 0
        assert harness.sample("odin_slow_consumers_total", action="closed") == 0


async def test_conflation_merges_the_channel_s_notices_into_one_in_order() -> None:
    config = make_config(**SMALL_QUEUE, **{"connection.slow_consumer_policy": "conflate"})
    async with lockstep_server(config) as harness:
        client = await subscribed_and_stuck(harness)
        publish(harness, 2)
        publish(harness, 1, dark=True)
        last = publish(harness, 8)
        await settled()
        assert harness.sample("odin_slow_consumers_total", action="conflated") >= 1
        messages = await client.read_until(lambda m: m.get("seq") == last)
        assert_in_order(messages, "BTC.trade")
        gaps = [(m["from"], m["to"], m["reason"]) for m in messages if m["type"] == "gap"]
        assert gaps == [(2, 7, "conflated")]  # the missed 4 is in it, not before or after it
        assert events_of(messages) == [1, 8, 9, 10, 11, 12]


async def test_conflation_across_an_epoch_change_never_spans_both_epochs() -> None:
    config = make_config(**SMALL_QUEUE, **{"connection.slow_consumer_policy": "conflate"})
    async with lockstep_server(config) as harness:
        client = await subscribed_and_stuck(harness)
        publish(harness, 3)
        harness.broker.lose_history()  # a new epoch: positions start again at 1
        last = publish(harness, 6)
        await settled()
        assert harness.sample("odin_slow_consumers_total", action="conflated") >= 1
        messages = await client.read_until(
            lambda m: m.get("seq") == last and m["epoch"] == harness.broker.epoch
        )
        shown: list[tuple[str, int, int]] = []
        for m in messages:
            if m["type"] == "gap":
                shown.append(("gap", m["from"], m["to"]))
            elif "seq" in m:
                age = "new" if m["epoch"] == harness.broker.epoch else "old"
                shown.append((age, m["seq"], m["prev"]))
        # One notice per epoch, each before its epoch's newest event, none spanning both.
        assert shown == [
            ("old", 1, 0),
            ("gap", 2, 3),
            ("old", 4, 3),
            ("gap", 1, 3),
            ("new", 4, 3),
            ("new", 5, 4),
            ("new", 6, 5),
        ]


async def test_a_slow_consumer_closing_itself_still_gets_the_answer_to_its_close() -> None:
    config = make_config(**SMALL_QUEUE)
    async with lockstep_server(config) as harness:
        client = await subscribed_and_stuck(harness)
        publish(harness, 2)
        await settled()
        await client.stream.send_all(client.ws.send(CloseConnection(code=1000)))
        await settled()  # the answer is queued behind the two events
        publish(harness, 8)  # the queue fills: the policy closes it, with its close begun
        await settled()
        messages = await client.read_until(lambda m: False)
        assert messages[-1] == {"type": "<close>", "code": 1000}
        assert events_of(messages) == [1, 2, 3]


@pytest.mark.parametrize("policy", ["close", "conflate"])
async def test_a_recovery_past_the_bound_leaves_live_messages_the_whole_bound(
    policy: str,
) -> None:
    config = make_config(**SMALL_QUEUE, **{"connection.slow_consumer_policy": policy})
    async with lockstep_server(config) as harness:
        publish(harness, 21)
        await settled()
        client = await LockstepClient.connect(harness)
        recover = {"BTC.trade": {"epoch": harness.broker.epoch, "seq": 1}}
        subscribe = {"channels": ["BTC.trade"], "recover": recover}
        await client.send({"type": "subscribe", "id": 1, "data": subscribe})
        await settled()  # the ack and 20 messages queued, past the bound of 8
        last = publish(harness, 7)  # the client has not read yet: live ones queue behind
        await settled()
        messages = await client.read_until(lambda m: m.get("seq") == last)
        assert harness.sample("odin_slow_consumers_total", action="closed") == 0
        assert harness.sample("odin_slow_consumers_total", action="conflated") == 0
        assert messages[0]["type"] == "subscription_ack" and messages[0]["recovered"]
        assert events_of(messages) == list(range(2, last + 1))
        assert_in_order(messages, "BTC.trade")

"""One client that stops reading never slows the others; it gets the policy's outcome, and
what the server holds for it stays within the configured bounds."""

from __future__ import annotations

import pytest
import trio

from tests.helpers import RawClient, make_config, running_server

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

"""Interest on a real nats-server: the consumer delivers only what clients subscribe to, and
every channel's positions stay exact as interest comes and goes (a channel's first message
has its predecessor looked up, the first messages of one read together)."""

from __future__ import annotations

import orjson
import pytest
import trio

from tests.nats.support import NatsServer, RawPublisher, nats_config, odin_on_nats, wait_until

pytestmark = pytest.mark.trio


async def stream_seqs(publisher: RawPublisher, count: int) -> int:
    """The stream's last position once it holds ``count`` messages."""
    with trio.fail_after(10):
        while True:
            info = orjson.loads(await publisher.request("$JS.API.STREAM.INFO.ODIN_TOKENS"))
            if info["state"]["messages"] >= count:
                return int(info["state"]["last_seq"])
            await trio.sleep(0.01)  # the stream's state, asked of NATS: polled, bounded


async def test_only_the_subscribed_subjects_are_delivered(nats_server: NatsServer) -> None:
    async with odin_on_nats(nats_config(nats_server.url)) as (harness, broker):
        await broker.wait_ready()
        publisher = await RawPublisher.connect(nats_server.port)
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            for n in range(50):
                await publisher.publish("odin.token.BTC.trade", {"n": n})
                await publisher.publish("odin.token.ETH.trade", {"n": n})
            await publisher.flush()
            events = await client.events(50)
        await publisher.aclose()
        assert [e["data"]["n"] for e in events] == list(range(50))
        assert broker.stats().ingested == 50  # none of the 50 ETH messages came
        assert not harness.context.reader.window.knows("ETH.trade")


async def test_positions_are_exact_for_channels_wanted_later(nats_server: NatsServer) -> None:
    channels = [f"C{n:02}.trade" for n in range(30)]
    config = nats_config(nats_server.url, **{"broker.interest_linger": 0})
    async with odin_on_nats(config) as (harness, broker):
        await broker.wait_ready()
        publisher = await RawPublisher.connect(nats_server.port)
        for round_ in range(3):
            for channel in channels:
                await publisher.publish(f"odin.token.{channel}", {"round": round_})
        await publisher.flush()
        await stream_seqs(publisher, 3 * len(channels))
        async with harness.client() as client:
            # Thirty channels at once: their first messages arrive in one read, and each
            # one's predecessor is looked up (together) before any is handed on.
            ack = await client.subscribe(channels)
            positions = {c: p["seq"] for c, p in ack["positions"].items()}
            for channel in channels:
                await publisher.publish(f"odin.token.{channel}", {"round": 3})
            await publisher.flush()
            events = await client.events(len(channels))
            assert {e["channel"]: e["prev"] for e in events} == positions

            # Dropped from the filter, published meanwhile, wanted again: linked to the
            # stream's last message, not to what the window once held.
            first = channels[0]
            await client.request(
                {"type": "unsubscribe", "data": {"channels": channels}}, "unsubscription_ack"
            )
            await wait_until(lambda: harness.context.interest.applied == frozenset())
            for round_ in range(4, 7):
                await publisher.publish(f"odin.token.{first}", {"round": round_})
            await publisher.flush()
            last = await stream_seqs(publisher, 3 * len(channels) + len(channels) + 3)
            ack = await client.subscribe([first])
            assert ack["positions"][first]["seq"] == last
            await publisher.publish(f"odin.token.{first}", {"round": 7})
            await publisher.flush()
            (event,) = await client.events(1)
            assert (event["prev"], event["data"]["round"]) == (last, 7)
        await publisher.aclose()
        assert broker.stats().resumes == 0  # filter changes are not resumptions

"""What the publisher puts into NATS: the right subjects and payloads in JetStream, each stored
once; market statistics beside the stream; an Odin server delivering them to a WebSocket
client; and publishing that survives a nats-server restart."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from typing import Any

import pytest
import trio

from tests.e2e.process import odin_process, port_of
from tests.helpers import open_client
from tests.nats.support import NatsServer, RawPublisher, odin_url_args
from tests.publisher.support import call, running_publisher, stored_messages, wait_for_stats

pytestmark = [pytest.mark.trio, pytest.mark.slow]

NONCE = re.compile(r"^\d+_[0-9a-z]{9}$")
PRICE_UPDATE = {"type", "tokenId", "price", "volume24h", "marketCap", "priceChange24h",
                "timestamp", "source", "nonce"}  # fmt: skip


def msg_id(message: dict[str, Any]) -> str:
    match = re.search(r"Nats-Msg-Id:\s*(\S+)", message["headers"])
    assert match, message
    return match.group(1)


async def next_statistics(nats_port: int) -> dict[str, Any]:
    """The next message on odin.market.statistics (a plain NATS subscription)."""
    import json

    client = await RawPublisher.connect(nats_port)
    try:
        await client.stream.send_all(b"SUB odin.market.statistics 9\r\n")
        await client.flush()
        while True:
            line = await client.read_line()
            if line.startswith(b"MSG "):
                size = int(line.split()[-1])
                with trio.fail_after(10):
                    while len(client.buffer) < size + 2:
                        client.buffer += await client.stream.receive_some(65536)
                body = client.buffer[:size]
                return dict(json.loads(body))
    finally:
        await client.aclose()


async def test_events_are_stored_once_each_with_their_subject_and_schema(
    nats_server: NatsServer,
) -> None:
    async with running_publisher(nats_server.url, {"simulation.statistics_interval": 0.2}) as port:
        status, _ = await call(
            port, "POST", "/control",
            {"action": "start", "messagesPerSecond": 200, "duration": 500,
             "tokens": ["BTC", "ETH"], "events": ["trade", "liquidity"]},
        )  # fmt: skip
        assert status == 200
        with trio.fail_after(10):
            statistics = await next_statistics(nats_server.port)
        stats = await wait_for_stats(port, lambda s: not s["isPublishing"])
    messages = await stored_messages(nats_server.port)
    # 500 ms at 200/s, paced from the first event: about 100, never a burst beyond it.
    assert 90 <= len(messages) <= 101
    assert stats["stats"]["messagesPublished"] == len(messages)
    assert Counter(m["subject"] for m in messages).keys() == {
        "odin.token.BTC.trade", "odin.token.ETH.trade",
        "odin.token.BTC.liquidity", "odin.token.ETH.liquidity",
    }  # fmt: skip
    assert len({msg_id(m) for m in messages}) == len(messages)
    for message in messages:
        data = message["data"]
        symbol, event = message["subject"].split(".")[2:]
        assert data["tokenId"] == symbol
        assert data["source"] == "simulator"
        assert NONCE.match(data["nonce"])
        if event == "trade":
            assert set(data) == PRICE_UPDATE
            assert data["type"] == "price:update"
        else:
            assert data["type"] == "liquidity:update"
    assert statistics["type"] == "market:statistics"
    assert statistics["activeTokens"] == 2
    assert [t["tokenId"] for t in statistics["topTokens"]] == ["BTC", "ETH"]


async def test_an_odin_server_delivers_what_the_publisher_publishes(
    nats_server: NatsServer,
) -> None:
    # Odin in its own process, as deployed (one trio-asyncio loop per process).
    with odin_process(odin_url_args(nats_server.url)) as odin:
        odin_port = port_of(odin.wait_for("listening"))
        odin.wait_for("broker_ready")
        async with running_publisher(nats_server.url) as port, open_client(odin_port) as client:
            await client.subscribe(["BTC.trade"])
            status, _ = await call(
                port, "POST", "/control",
                {"action": "start", "messagesPerSecond": 100, "tokens": ["BTC", "SOL"]},
            )  # fmt: skip
            assert status == 200
            events = await client.events(10)
            await call(port, "POST", "/control", {"action": "stop"})
    assert {event["channel"] for event in events} == {"BTC.trade"}
    assert all(event["data"]["type"] == "price:update" for event in events)
    assert all(event["data"]["tokenId"] == "BTC" for event in events)
    for before, after in itertools.pairwise(events):
        assert after["prev"] == before["seq"]  # linked: nothing missed in between


async def test_publishing_goes_on_through_a_nats_restart(nats_server: NatsServer) -> None:
    async with running_publisher(nats_server.url) as port:
        status, _ = await call(
            port, "POST", "/control", {"action": "start", "messagesPerSecond": 100}
        )
        assert status == 200
        await wait_for_stats(port, lambda s: s["stats"]["messagesPublished"] >= 50)
        await trio.to_thread.run_sync(nats_server.kill)
        with trio.fail_after(10):
            while (await call(port, "GET", "/health"))[1]["nats"] != "disconnected":
                await trio.sleep(0.05)
        assert (await call(port, "GET", "/ready"))[0] == 503
        # Publishes meanwhile are queued, not refused: 50 of them (half a second's).
        down = await wait_for_stats(port, lambda s: s["stats"]["inFlight"] >= 50)
        assert down["stats"]["errors"] == 0
        assert down["stats"]["inFlight"] > 0  # held until NATS is back
        await trio.to_thread.run_sync(nats_server.start)
        resumed = await wait_for_stats(
            port,
            lambda s: s["stats"]["messagesPublished"] >= down["stats"]["messagesPublished"] + 150,
            timeout=30,
        )
        assert resumed["isPublishing"] is True
        assert (resumed["stats"]["errors"], resumed["stats"]["dropped"]) == (0, 0)
        assert (await call(port, "GET", "/health"))[1]["status"] == "healthy"
        await call(port, "POST", "/control", {"action": "stop"})
        final = await wait_for_stats(port, lambda s: s["stats"]["inFlight"] == 0)
    messages = await stored_messages(nats_server.port)
    ids = [msg_id(m) for m in messages]
    assert len(ids) == len(set(ids))  # a retried publish was stored once
    # Once settled, what was acknowledged is what the stream holds (file storage survives
    # the restart).
    assert len(messages) == final["stats"]["messagesPublished"]

"""A client written for the original server gets only the message types it knew; Odin's
additions (hello, gap, reconnect, replay_complete) go to clients that ask for protocol v1."""

from __future__ import annotations

import pytest
import trio

from odin_fanout.protocol.negotiation import SUBPROTOCOL_V1
from tests.helpers import (
    hold_clients,
    http_exchange,
    make_config,
    running_server,
    upgrade_request,
)

pytestmark = pytest.mark.trio

ORIGINAL_TYPES = {"subscription_ack", "unsubscription_ack", "pong", "error", "replay_incomplete"}


async def test_a_legacy_client_gets_no_hello_and_its_first_message_is_the_ack() -> None:
    async with running_server() as harness, harness.client(v1=False) as client:
        await client.send({"type": "subscribe", "data": {"channels": ["BTC.trade"]}})
        first = await client.recv()
        assert first["type"] == "subscription_ack"
        assert client.ws.subprotocol is None


async def test_the_v1_subprotocol_is_echoed_and_hello_comes_first() -> None:
    async with running_server() as harness, harness.client(v1=True) as client:
        assert client.ws.subprotocol == SUBPROTOCOL_V1
        assert client.hello["version"] == 1


async def test_the_query_parameter_asks_for_v1_without_a_subprotocol() -> None:
    async with (
        running_server() as harness,
        harness.client(v1=False, resource="/ws?protocol=1") as client,
    ):
        assert (await client.expect("hello"))["version"] == 1
        assert client.ws.subprotocol is None


async def test_an_unsupported_version_is_refused_with_400_naming_it() -> None:
    async with running_server() as harness:
        status, _, body = await http_exchange(harness.port, upgrade_request("/ws?protocol=7"))
    assert status == 400
    assert b"protocol=7" in body


async def test_an_undeliverable_publication_is_a_gap_for_v1_and_a_skipped_position_for_legacy():
    async with (
        running_server() as harness,
        harness.client(v1=False) as legacy,
        harness.client() as modern,
    ):
        await legacy.subscribe(["BTC.trade"])
        await modern.subscribe(["BTC.trade"])
        first = harness.publish("BTC.trade", {"n": 1})
        harness.publish("BTC.trade", b"not json")
        third = harness.publish("BTC.trade", {"n": 3})
        seen = [await legacy.recv(), await legacy.recv()]
        assert [m.get("seq") for m in seen] == [first, third]
        assert seen[1]["prev"] == third - 1  # the skipped position is visible in the envelope
        modern_seen = [await modern.recv() for _ in range(3)]
        assert [m.get("type") for m in modern_seen][1] == "gap"
        assert (await legacy.request({"type": "heartbeat"}, "pong"))["type"] == "pong"


async def test_replay_ends_with_replay_complete_only_for_v1() -> None:
    async with (
        running_server() as harness,
        harness.client(v1=False) as legacy,
        harness.client() as modern,
    ):
        for client in (legacy, modern):
            await client.subscribe(["BTC.trade"])
        seqs = [harness.publish("BTC.trade", {"n": n}) for n in range(3)]
        await harness.settle()
        for client in (legacy, modern):
            await client.events(3)
            await client.send({"type": "replay", "id": 7, "data": {"since": seqs[0]}})
        assert [m["seq"] for m in await modern.events(2)] == seqs[1:]
        assert (await modern.expect("replay_complete"))["sent"] == 2
        assert [m["seq"] for m in await legacy.events(2)] == seqs[1:]
        # The next thing a legacy client reads is the answer to its heartbeat.
        assert (await legacy.request({"type": "heartbeat"}, "pong"))["type"] == "pong"


async def test_an_incomplete_replay_tells_legacy_clients_sent_and_total() -> None:
    config = make_config(**{"history.max_messages": 2})
    async with running_server(config) as harness, harness.client(v1=False) as legacy:
        await legacy.subscribe(["BTC.trade"])
        seqs = [harness.publish("BTC.trade", {"n": n}) for n in range(5)]
        await harness.settle()
        await legacy.events(5)
        request = {"channel": "BTC.trade", "from": seqs[0], "to": seqs[-1]}
        await legacy.send({"type": "replay", "data": request})
        assert [m["seq"] for m in await legacy.events(2)] == seqs[3:]
        reply = await legacy.expect("replay_incomplete")
        assert (reply["sent"], reply["total"], reply["reason"]) == (2, 5, "history_expired")


async def test_on_drain_legacy_clients_get_only_the_close_and_v1_clients_the_hint_first() -> None:
    config = make_config(**{"shutdown.reconnect_min_ms": 100, "shutdown.reconnect_max_ms": 200})
    async with running_server(config) as harness, trio.open_nursery() as nursery:
        legacy = await hold_clients(nursery, lambda: harness.client(v1=False), 2, ["BTC.trade"])
        modern = await hold_clients(nursery, harness.client, 2, ["BTC.trade"])
        harness.server.request_shutdown()
        with trio.fail_after(10):
            await harness.server.stopped.wait()
    for messages, code, reason in legacy:
        assert (code, reason) == (1001, "server shutting down")
        assert {m["type"] for m in messages} <= ORIGINAL_TYPES
    for messages, code, _ in modern:
        assert code == 1001
        assert [m["type"] for m in messages if "seq" not in m] == ["reconnect"]

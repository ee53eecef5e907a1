"""The NATS broker against a real nats-server: plain publishes reach subscribers, positions
come from JetStream, and bad input never stops the bridge."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trio

from tests.helpers import capture_logs, checkpoint_chain
from tests.nats.support import NatsServer, RawPublisher, nats_config, odin_on_nats, wait_until

pytestmark = [pytest.mark.trio, pytest.mark.slow]


async def test_plain_nats_publishes_reach_subscribers_in_order(nats_server: NatsServer) -> None:
    async with odin_on_nats(nats_config(nats_server.url)) as (harness, broker):
        await broker.wait_ready()
        publisher = await RawPublisher.connect(nats_server.port)
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade", "ETH.*"])
            # Nothing published yet: the channel's position is 0 (from the stream).
            assert ack["positions"]["BTC.trade"]["seq"] == 0
            assert ack["positions"]["BTC.trade"]["epoch"] == broker.epoch
            for n in range(30):
                symbol = ("BTC", "ETH", "SOL")[n % 3]
                await publisher.publish(f"odin.token.{symbol}.trade", {"n": n})
            await publisher.publish("odin.token.ETH.liquidity", {"n": 30})
            await publisher.flush()
            events = await client.events(21)
        await publisher.aclose()
    assert [e["channel"] for e in events[:3]] == ["BTC.trade", "ETH.trade", "BTC.trade"]
    assert {e["channel"] for e in events} == {"BTC.trade", "ETH.trade", "ETH.liquidity"}
    # Positions are the stream's sequence: subject n of 31 published is at n + 1.
    assert [e["data"]["n"] + 1 for e in events] == [e["seq"] for e in events]
    assert checkpoint_chain(events, {"BTC.trade": 0}) == []
    assert events[0]["prev"] == 0  # the channel's first message ever
    assert {e["epoch"] for e in events} == {broker.epoch}


async def test_a_position_from_before_this_process_is_linked_from_the_stream(
    nats_server: NatsServer,
) -> None:
    publisher = await RawPublisher.connect(nats_server.port)
    config = nats_config(nats_server.url)
    async with odin_on_nats(config) as (_, broker):
        await broker.wait_ready()  # the stream exists now
    for n in range(3):
        await publisher.publish("odin.token.BTC.trade", {"n": n})
    await publisher.flush()
    # A new Odin process: it never saw those three, but the fourth links to the third.
    async with odin_on_nats(config) as (harness, broker):
        await broker.wait_ready()
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"])
            assert ack["positions"]["BTC.trade"]["seq"] == 3
            await publisher.publish("odin.token.BTC.trade", {"n": 3})
            await publisher.flush()
            (event,) = await client.events(1)
    await publisher.aclose()
    assert (event["seq"], event["prev"]) == (4, 3)


async def test_bad_payloads_and_subjects_are_counted_and_never_stop_the_bridge(
    nats_server: NatsServer,
) -> None:
    # Consuming every subject: what a client subscribes to never matches a malformed one.
    config = nats_config(nats_server.url, **{"broker.max_payload": 1024, "broker.interest": "all"})
    with capture_logs() as logs:
        async with odin_on_nats(config) as (harness, broker):
            await broker.wait_ready()
            publisher = await RawPublisher.connect(nats_server.port)
            async with harness.client() as client:
                await client.subscribe(["BTC.*"])
                # Captured by the stream (odin.token.>) but not SYMBOL.event:
                for subject in ("odin.token.BTC", "odin.token.BTC.trade.extra"):
                    await publisher.publish(subject, {"n": 0})
                await publisher.publish("odin.token.ETH", {"n": 1})  # same shape: logged once
                await publisher.publish("odin.token.BTC.trade", b"not json")
                await publisher.publish("odin.token.BTC.trade", {"pad": "x" * 2000})
                await publisher.publish("odin.token.BTC.trade", {"n": "good"})
                await publisher.flush()
                received = [await client.recv() for _ in range(3)]
            await publisher.aclose()
            await wait_until(lambda: broker.stats().bad_subjects == 3)
    assert [(m["type"], m.get("reason")) for m in received] == [
        ("gap", "invalid_payload"), ("gap", "payload_too_large"), ("trade:update", None)
    ]  # fmt: skip
    assert received[2]["data"] == {"n": "good"}
    assert received[2]["prev"] == received[1]["to"]
    events = [entry["event"] for entry in logs]
    assert events.count("bad_subject") == 2  # once per subject shape
    assert events.count("invalid_payload") == 1
    assert events.count("payload_too_large") == 1
    assert harness.sample("odin_refused_publications_total", reason="invalid_payload") == 1


async def test_unreachable_nats_at_start_is_retried_and_served_once_it_appears(
    tmp_path: trio.Path,
) -> None:
    from pathlib import Path

    from tests.helpers import http_get

    server = NatsServer(Path(tmp_path) / "nats")
    port = server.port
    server.stop()  # the port is known and nothing listens on it
    try:
        async with odin_on_nats(nats_config(f"nats://127.0.0.1:{port}")) as (harness, broker):
            status, _, _ = await http_get(harness.port, "/ready")
            assert status == 503
            status, _, body = await http_get(harness.port, "/health")
            assert status == 503
            assert b'"unhealthy"' in body
            async with harness.client() as client:  # clients are served meanwhile
                # (a subscribe first waits history.read_timeout for a broker never ready yet)
                ack = await client.request(
                    {"type": "subscribe", "data": {"channels": ["BTC.trade"],
                     "recover": {"BTC.trade": {"epoch": "e", "seq": 1}}}},
                    "subscription_ack", timeout=15,
                )  # fmt: skip
                assert ack["recovery"]["BTC.trade"]["reason"] == "broker_unavailable"
                assert "positions" not in ack  # no history known yet: no position to give
                await trio.to_thread.run_sync(server.start)
                with trio.fail_after(15):
                    await broker.wait_ready()
                status, _, _ = await http_get(harness.port, "/ready")
                assert status == 200
                publisher = await RawPublisher.connect(port)
                await publisher.publish("odin.token.BTC.trade", {"n": 1})
                await publisher.flush()
                await publisher.aclose()
                (event,) = await client.events(1)
                assert event["data"] == {"n": 1}
    finally:
        server.stop()


async def test_a_recreated_stream_is_a_new_epoch(nats_server: NatsServer) -> None:
    async with odin_on_nats(nats_config(nats_server.url)) as (harness, broker):
        await broker.wait_ready()
        old_epoch = broker.epoch
        publisher = await RawPublisher.connect(nats_server.port)
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            await publisher.publish("odin.token.BTC.trade", {"n": 1})
            await publisher.flush()
            (before,) = await client.events(1)
            # The history is lost: the stream is deleted (Odin recreates it).
            reply = await publisher.request("$JS.API.STREAM.DELETE.ODIN_TOKENS")
            assert b'"success":true' in reply
            await wait_until(lambda: broker.epoch != old_epoch)
            await publisher.publish("odin.token.BTC.trade", {"n": 2})
            await publisher.flush()
            (after,) = await client.events(1)
        position = {"epoch": before["epoch"], "seq": before["seq"]}
        async with harness.client() as client:
            ack = await client.subscribe(["BTC.trade"], recover={"BTC.trade": position})
            latest = (await client.events(1))[0]
        await publisher.aclose()
    assert before["epoch"] == old_epoch
    assert (after["epoch"], after["seq"], after["prev"]) == (broker.epoch, 1, 0)
    assert ack["recovery"]["BTC.trade"]["reason"] == "epoch_changed"
    assert ack["positions"]["BTC.trade"] == {"epoch": broker.epoch, "seq": 1}
    assert latest["data"] == {"n": 2}


async def test_an_idle_consumer_is_kept_and_a_lost_one_resumes_after_the_last_message(
    nats_server: NatsServer,
) -> None:
    heartbeat = 0.5
    config = nats_config(nats_server.url, **{"nats.consumer_heartbeat": heartbeat})
    async with odin_on_nats(config) as (harness, broker):
        await broker.wait_ready()
        publisher = await RawPublisher.connect(nats_server.port)
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            await publisher.publish("odin.token.BTC.trade", {"n": 1})
            await publisher.flush()
            (first,) = await client.events(1)
            # Idle for several heartbeats: the server's heartbeats keep the consumer alive.
            await trio.sleep(heartbeat * 4)
            assert broker.stats().resumes == 0
            # The consumer disappears on the server (an operator, a restart that lost it) and
            # the stream goes on: Odin notices the silence and reads on from where it was.
            names = orjson.loads(await publisher.request("$JS.API.CONSUMER.NAMES.ODIN_TOKENS"))
            (name,) = names["consumers"]
            reply = await publisher.request(f"$JS.API.CONSUMER.DELETE.ODIN_TOKENS.{name}")
            assert b'"success":true' in reply
            for n in (2, 3):
                await publisher.publish("odin.token.BTC.trade", {"n": n})
            await publisher.flush()
            later = await client.events(2)
        await publisher.aclose()
        assert broker.stats().resumes >= 1
    assert [event["data"]["n"] for event in later] == [2, 3]
    assert later[0]["prev"] == first["seq"]
    assert later[1]["prev"] == later[0]["seq"]


async def test_credentials_in_the_url_are_used_and_never_logged(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", extra_args=("--user", "odin", "--pass", "s3cret-pw"))
    try:
        url = f"nats://odin:s3cret-pw@127.0.0.1:{server.port}"
        with capture_logs() as logs:
            async with odin_on_nats(nats_config(url)) as (harness, broker):
                with trio.fail_after(10):
                    await broker.wait_ready()
                async with harness.client() as client:
                    await client.subscribe(["BTC.trade"])
                    await broker.publish("BTC.trade", b'{"n":1}')
                    (event,) = await client.events(1)
                status = broker.status()
    finally:
        server.stop()
    assert event["data"] == {"n": 1}
    assert "s3cret" not in status.location
    assert logs
    assert not [entry for entry in logs if "s3cret" in repr(entry)]


async def test_publishes_with_a_message_id_are_delivered_and_a_repeat_is_stored_once(
    nats_server: NatsServer,
) -> None:
    """A publish with headers (Nats-Msg-Id) reaches clients like a plain one; publishing the
    same id again (a retry) adds nothing to the history."""
    async with odin_on_nats(nats_config(nats_server.url)) as (harness, broker):
        await broker.wait_ready()
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            await broker.publish("BTC.trade", b'{"n":1}', msg_id="order-1")
            await broker.publish("BTC.trade", b'{"n":1}', msg_id="order-1")
            await broker.publish("BTC.trade", b'{"n":2}', msg_id="order-2")
            first, second = await client.events(2)
            await wait_until(lambda: broker.stats().published == 3)
    assert (first["data"], second["data"]) == ({"n": 1}, {"n": 2})
    assert second["prev"] == first["seq"]
    assert broker.stats().publish_failed == 0

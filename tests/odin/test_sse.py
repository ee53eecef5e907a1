"""``GET /sse``: the same events as the WebSocket as ``text/event-stream``, resumed exactly
from ``Last-Event-ID``; the same limits, tokens and namespaces; read with a reader that parses
the stream as a browser's EventSource does (tests/sse_client.py)."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from tests.helpers import Harness, make_config, running_server
from tests.nats.support import NatsServer, nats_config, odin_on_nats
from tests.sse_client import SseStream, open_sse

pytestmark = pytest.mark.trio

SECRET = "an-sse-test-secret-of-32-bytes-or-more"


def gauge(harness: Harness, name: str) -> float:
    value = harness.context.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def started(stream: SseStream) -> dict[str, Any]:
    """Read the stream's opening (hello, then the ack); the ack."""
    assert stream.status == 200, stream.body
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert (await stream.next()).event == "hello"
    ack = await stream.until("subscription_ack")
    return ack.json()  # type: ignore[no-any-return]


async def test_events_are_the_websocket_envelopes_with_the_cursor_as_their_id() -> None:
    async with running_server() as harness, harness.client() as ws:
        await ws.subscribe(["BTC.*"])
        async with open_sse(harness.port, "channels=BTC.*") as stream:
            await started(stream)
            first = harness.publish("BTC.trade", {"price": 1})
            second = harness.publish("BTC.liquidity", {"depth": 2})
            events = [await stream.next(), await stream.next()]
            envelopes = await ws.events(2)
    epoch = harness.broker.epoch
    assert [e.event for e in events] == ["message", "message"]
    assert [e.last_event_id for e in events] == [f"{epoch}:{first}", f"{epoch}:{second}"]
    assert [e.json() for e in events] == envelopes  # the same documents, byte for byte
    assert stream.retry is not None


async def test_a_reconnect_with_last_event_id_gets_exactly_what_it_missed_in_order() -> None:
    async with running_server() as harness:
        harness.publish("ETH.trade", {"n": 0})
        async with open_sse(harness.port, "channels=BTC.*,ETH.trade") as stream:
            await started(stream)
            seen = [harness.publish("BTC.trade", {"n": 1}), harness.publish("ETH.trade", {"n": 2})]
            got = await stream.messages(2)
            cursor = stream.last_event_id
        assert [m["seq"] for m in got] == seen
        # Missed while away: several channels, one the pattern never had before.
        missed = [
            harness.publish("ETH.trade", {"n": 3}),
            harness.publish("BTC.social", {"n": 4}),
            harness.publish("BTC.trade", {"n": 5}),
            harness.publish("SOL.trade", {"n": 6}),  # not the stream's
            harness.publish("ETH.trade", {"n": 7}),
        ]
        wanted = [seq for seq in missed if seq != missed[3]]
        async with open_sse(
            harness.port, "channels=BTC.*,ETH.trade", {"Last-Event-ID": cursor}
        ) as stream:
            ack = await started(stream)
            replayed = await stream.messages(len(wanted))
            live = harness.publish("BTC.trade", {"n": 8})
            (after,) = await stream.messages(1)
    assert ack["recovered"] is True
    assert all(report["recovered"] for report in ack["recovery"].values())
    assert [m["seq"] for m in replayed] == wanted
    assert after["seq"] == live
    assert stream.last_event_id.endswith(f":{live}")


async def test_the_cursor_can_come_in_the_url_for_a_page_that_starts_a_new_stream() -> None:
    async with running_server() as harness:
        async with open_sse(harness.port, "channels=BTC.trade") as stream:
            await started(stream)
            harness.publish("BTC.trade", {"n": 1})
            await stream.messages(1)
            cursor = stream.last_event_id
        missed = harness.publish("BTC.trade", {"n": 2})
        async with open_sse(harness.port, f"channels=BTC.trade&last_event_id={cursor}") as stream:
            ack = await started(stream)
            (event,) = await stream.messages(1)
    assert ack["recovered"] is True
    assert event["seq"] == missed


async def test_a_stream_that_got_nothing_yet_still_resumes_from_where_it_began() -> None:
    async with running_server() as harness:
        harness.publish("BTC.trade", {"n": 0})
        await harness.settle()
        async with open_sse(harness.port, "channels=BTC.trade") as stream:
            await started(stream)
            # The stream says where it begins before any event: a drop now loses nothing.
            cursor = await stream.until_id()
        missed = harness.publish("BTC.trade", {"n": 1})
        async with open_sse(harness.port, "channels=BTC.trade", {"Last-Event-ID": cursor}) as s:
            ack = await started(s)
            (event,) = await s.messages(1)
    assert ack["recovered"] is True
    assert event["seq"] == missed


async def test_a_new_history_is_reported_not_recovered_with_the_latest_value() -> None:
    async with running_server() as harness:
        async with open_sse(harness.port, "channels=BTC.trade") as stream:
            await started(stream)
            harness.publish("BTC.trade", {"n": 1})
            await stream.messages(1)
            cursor = stream.last_event_id
        harness.broker.lose_history()
        latest = harness.publish("BTC.trade", {"n": 2})
        await harness.settle()
        async with open_sse(harness.port, "channels=BTC.trade", {"Last-Event-ID": cursor}) as s:
            ack = await started(s)
            (event,) = await s.messages(1)
    assert ack["recovered"] is False
    assert ack["recovery"]["BTC.trade"]["reason"] == "epoch_changed"
    assert event["seq"] == latest
    assert event["epoch"] == harness.broker.epoch


async def test_a_publishers_json_over_several_lines_arrives_whole() -> None:
    body = b'{\n  "price": 1,\r\n  "note": "two\\nlines"\r}'
    async with running_server() as harness, open_sse(harness.port, "channels=BTC.trade") as s:
        await started(s)
        harness.publish("BTC.trade", body)
        (event,) = await s.messages(1)
    assert event["data"] == {"price": 1, "note": "two\nlines"}


@pytest.mark.parametrize(
    ("query", "headers", "status", "says"),
    [
        ("channels=btc.trade", {}, 400, "INVALID_CHANNEL"),
        ("", {}, 400, "channels: name at least one"),
        ("channels=BTC.trade", {"Last-Event-ID": "yesterday"}, 400, "Last-Event-ID"),
        ("channels=" + ",".join(f"S{i}.trade" for i in range(200)), {}, 400, "SUBSCRIPTION_LIMIT"),
    ],
)
async def test_bad_requests_are_refused_with_what_is_wrong(
    query: str, headers: dict[str, str], status: int, says: str
) -> None:
    async with running_server() as harness, open_sse(harness.port, query, headers) as stream:
        assert stream.status == status
        assert says.encode() in stream.body
        assert len(harness.context.registry.connections) == 0


async def test_only_get_opens_a_stream() -> None:
    from tests.helpers import http_exchange

    async with running_server() as harness:
        request = b"POST /sse?channels=BTC.trade HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        status, headers, _ = await http_exchange(harness.port, request)
    assert status == 405
    assert "GET" in headers["allow"]


async def test_tokens_and_namespaces_apply_as_on_a_websocket() -> None:
    config = make_config(
        **{
            "auth.hmac_secret": SECRET,
            "auth.query_token": True,
            "auth.namespaces": ["PRIV.*=token"],
        }
    )
    allowed = jwt.encode({"sub": "ann", "channels": ["PRIV.trade"]}, SECRET, algorithm="HS256")
    async with running_server(config) as harness:
        async with open_sse(harness.port, "channels=PRIV.trade") as stream:
            assert stream.status == 403
            assert b"FORBIDDEN" in stream.body
        async with open_sse(harness.port, "channels=PRIV.trade&token=not-a-jwt") as stream:
            assert stream.status == 401
        async with open_sse(
            harness.port, "channels=PRIV.trade", {"Authorization": f"Bearer {allowed}"}
        ) as stream:
            await started(stream)
            seq = harness.publish("PRIV.trade", {"n": 1})
            (event,) = await stream.messages(1)
            assert event["seq"] == seq
        async with open_sse(harness.port, f"channels=PRIV.trade&token={allowed}") as stream:
            await started(stream)


async def test_a_required_token_missing_is_401() -> None:
    config = make_config(**{"auth.hmac_secret": SECRET, "auth.required": True})
    async with running_server(config) as harness, open_sse(harness.port, "channels=BTC.trade") as s:
        assert s.status == 401
        assert "bearer" in s.headers["www-authenticate"].lower()


async def test_a_stream_takes_a_place_under_the_connection_limit() -> None:
    async with running_server(make_config(**{"server.max_connections": 1})) as harness:
        async with open_sse(harness.port, "channels=BTC.trade") as first:
            await started(first)
            assert gauge(harness, "odin_sse_streams_active") == 1
            assert gauge(harness, "odin_connections_active") == 1
            async with open_sse(harness.port, "channels=BTC.trade") as second:
                assert second.status == 503
                assert second.headers["retry-after"] == "5"
        await harness.wait_connections(0)
        assert gauge(harness, "odin_sse_streams_active") == 0


async def test_a_drain_tells_the_browser_when_to_come_back_then_ends_the_stream() -> None:
    config = make_config(**{"shutdown.reconnect_min_ms": 300, "shutdown.reconnect_max_ms": 600})
    async with running_server(config) as harness, open_sse(harness.port, "channels=BTC.*") as s:
        await started(s)
        harness.server.request_shutdown()
        hint = (await s.until("reconnect")).json()
        with pytest.raises(EOFError):
            await s.next()
    assert 300 <= hint["after_ms"] <= 600
    assert s.retry == hint["after_ms"]


async def test_a_kick_ends_the_stream_with_a_close_event_naming_the_code() -> None:
    async with running_server() as harness, open_sse(harness.port, "channels=BTC.*") as s:
        await started(s)
        (connection,) = harness.context.registry.connections.values()
        connection.request_close(4001, "closed by operator", "operator")
        close = (await s.until("close")).json()
        with pytest.raises(EOFError):
            await s.next()
    assert close == {"type": "close", "code": 4001, "reason": "closed by operator"}


async def test_resuming_on_another_instance_reads_the_pattern_s_channels_from_nats(
    nats_server: NatsServer,
) -> None:
    """The cursor from one Odin resumes on another that has never seen the channels: the
    pattern's channels come from the stream's history (NATS direct gets), not a local window."""
    config = nats_config(nats_server.url)
    async with odin_on_nats(config) as (first, broker):
        await broker.wait_ready()
        async with open_sse(first.port, "channels=BTC.*") as stream:
            await started(stream)
            await broker.publish("BTC.trade", b'{"n": 1}')
            (seen,) = await stream.messages(1, timeout=10)
            cursor = stream.last_event_id
        missed = []
        for n, channel in enumerate(["BTC.social", "ETH.trade", "BTC.trade", "BTC.metadata"]):
            await broker.publish(channel, json.dumps({"n": n}).encode())
            missed.append(channel)
    async with odin_on_nats(config) as (second, other):
        await other.wait_ready()
        async with open_sse(second.port, "channels=BTC.*", {"Last-Event-ID": cursor}) as stream:
            ack = await started(stream)
            replayed = await stream.messages(3, timeout=10)
    assert ack["recovered"] is True
    assert set(ack["recovery"]) == {"BTC.trade", "BTC.social", "BTC.metadata"}
    assert [m["channel"] for m in replayed] == ["BTC.social", "BTC.trade", "BTC.metadata"]
    assert [m["seq"] for m in replayed] == sorted(m["seq"] for m in replayed)
    assert replayed[0]["seq"] > seen["seq"]

"""Bad or abusive input gets a clear answer (an error code, an HTTP status, a close code) and
never affects other clients."""

from __future__ import annotations

import json
import time

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from odin_fanout.server.endpoints import CpuSampler
from tests.helpers import Harness, http_exchange, make_config, running_server, upgrade_request

pytestmark = pytest.mark.trio


async def test_rate_limit_errors_then_closes_sustained_abuse() -> None:
    config = make_config(
        **{
            "connection.rate_limit_burst": 5,
            "connection.rate_limit_per_second": 1,
            "connection.rate_limit_abuse_threshold": 10,
        }
    )
    async with running_server(config) as harness:
        async with harness.client() as client, harness.client() as bystander:
            await bystander.subscribe(["BTC.trade"])
            for _ in range(5):
                await client.send({"type": "heartbeat"})
            assert [(await client.recv())["type"] for _ in range(5)] == ["pong"] * 5
            await client.send({"type": "heartbeat"})
            error = await client.expect("error")
            assert error["code"] == "RATE_LIMIT_EXCEEDED"
            assert "slow down" in error["message"]
            # Keep going, one frame at a time: each is refused until the abuse limit closes.
            closed = None
            for _ in range(30):
                await client.send({"type": "heartbeat"})
                try:
                    reply = await client.recv()
                except ConnectionClosed as exc:
                    closed = exc.reason
                    break
                assert reply["code"] == "RATE_LIMIT_EXCEEDED"
            assert closed is not None
            assert (closed.code, closed.reason) == (1008, "rate limit abuse")
            # The bystander is untouched.
            seq = harness.publish("BTC.trade", {"n": 1})
            assert [e["seq"] for e in await bystander.events(1)] == [seq]
        assert harness.sample("odin_rate_limited_messages_total") >= 10
        assert harness.sample("odin_connections_closed_total", reason="rate_limit") == 1


async def test_oversized_message_closes_with_1009_only_that_client() -> None:
    config = make_config(**{"server.max_message_size": 1024})
    async with running_server(config) as harness:
        async with harness.client() as client, harness.client() as bystander:
            await bystander.subscribe(["BTC.trade"])
            await client.send({"type": "heartbeat", "pad": "x" * 2000})
            _, code, _ = await client.until_closed()
            assert code == 1009
            seq = harness.publish("BTC.trade", {"n": 1})
            assert [e["seq"] for e in await bystander.events(1)] == [seq]
        await harness.wait_connections(0)
        assert harness.sample("odin_connections_closed_total", reason="message_too_big") == 1


@pytest.mark.parametrize(
    ("frame", "code", "text"),
    [
        ("{not json", "INVALID_JSON", "not valid JSON"),
        ("[1, 2]", "INVALID_MESSAGE", "JSON object"),
        ('{"data": {}}', "INVALID_MESSAGE", "'type'"),
        ('{"type": "ping"}', "UNKNOWN_TYPE", "unknown type 'ping'"),
        ('{"type": "subscribe"}', "INVALID_MESSAGE", "required field missing @ $.data"),
        ('{"type": "subscribe", "data": {"channels": "BTC.trade"}}', "INVALID_MESSAGE",
         "expected a list"),
        ('{"type": "subscribe", "data": {"channels": ["btc.trade"]}}', "INVALID_CHANNEL",
         "upper-case"),
        ('{"type": "subscribe", "data": {"channels": ["BTC.price"]}}', "INVALID_CHANNEL",
         "unknown event 'price'"),
        ('{"type": "subscribe", "data": {"channels": ["BTC"]}}', "INVALID_CHANNEL",
         "SYMBOL.event"),
        ('{"type": "replay", "data": {"channel": "BTC.trade"}}', "INVALID_MESSAGE",
         "either 'since' or 'from' and 'to'"),
        ('{"type": "replay", "data": {"channel": "BTC.*", "since": 1}}', "INVALID_CHANNEL",
         "pattern"),
        ('{"type": "replay", "data": {"from": 5, "to": 2}}', "INVALID_POSITION", "from"),
    ],
)  # fmt: skip
async def test_bad_messages_get_an_error_reply_and_the_connection_stays(
    frame: str, code: str, text: str
) -> None:
    async with running_server() as harness, harness.client() as client:
        await client.send(frame)
        error = await client.expect("error")
        assert error["code"] == code
        assert text in error["message"]
        assert (await client.request({"type": "heartbeat", "id": 7}, "pong"))["id"] == 7
        assert harness.sample("odin_client_errors_total", code=code) == 1


async def test_error_replies_echo_the_request_id() -> None:
    async with running_server() as harness, harness.client() as client:
        await client.send({"type": "subscribe", "id": "s-1", "data": {"channels": ["nope"]}})
        error = await client.expect("error")
        assert (error["id"], error["request"], error["code"]) == ("s-1", "subscribe",
                                                                 "INVALID_CHANNEL")  # fmt: skip


async def test_binary_frames_are_refused_with_an_error() -> None:
    async with running_server() as harness, harness.client() as client:
        await client.ws.send_message(b'{"type": "heartbeat"}')
        assert (await client.expect("error"))["code"] == "BINARY_NOT_SUPPORTED"


async def test_subscription_limit() -> None:
    config = make_config(**{"connection.max_subscriptions": 3})
    async with running_server(config) as harness, harness.client() as client:
        assert client.hello["limits"]["max_subscriptions"] == 3
        assert (await client.subscribe(["BTC.trade", "ETH.trade"]))["count"] == 2
        error = await client.subscribe(["SOL.trade", "DOGE.trade"])
        assert error["code"] == "SUBSCRIPTION_LIMIT"
        # Nothing of the refused request was applied; a fitting one still is.
        assert (await client.subscribe(["BTC.trade", "SOL.trade"]))["count"] == 3


async def test_origin_allow_list() -> None:
    config = make_config(**{"server.allowed_origins": "https://app.example"})
    async with running_server(config) as harness:
        status, _, body = await http_exchange(
            harness.port, upgrade_request(headers=[("Origin", "https://evil.example")])
        )
        assert (status, body) == (403, b"origin not allowed\n")
        status, _, _ = await http_exchange(
            harness.port, upgrade_request(headers=[("Origin", "https://app.example")])
        )
        assert status == 101
        async with harness.client(headers=[(b"Origin", b"https://app.example")]) as client:
            assert client.hello["type"] == "hello"
        # Non-browser clients send no Origin: they are let in (docs/protocol.md).
        status, _, _ = await http_exchange(harness.port, upgrade_request())
        assert status == 101
        assert harness.sample("odin_connections_rejected_total", reason="origin") == 1


async def test_require_origin_refuses_requests_without_one() -> None:
    config = make_config(
        **{"server.allowed_origins": "https://app.example", "server.require_origin": True}
    )
    async with running_server(config) as harness:
        status, _, body = await http_exchange(harness.port, upgrade_request())
        assert (status, body) == (403, b"origin not allowed\n")
        status, _, _ = await http_exchange(
            harness.port, upgrade_request(headers=[("Origin", "https://app.example")])
        )
        assert status == 101


async def test_connection_limit_answers_503_with_retry_after() -> None:
    config = make_config(**{"server.max_connections": 2, "server.retry_after": 7})
    async with running_server(config) as harness:
        async with harness.client(), harness.client():
            status, headers, _ = await http_exchange(harness.port, upgrade_request())
            assert status == 503
            assert headers["retry-after"] == "7"
            assert harness.sample("odin_connections_rejected_total", reason="at_capacity") == 1
        await harness.wait_connections(0)
        async with harness.client() as client:
            assert client.hello["type"] == "hello"


async def test_handshake_timeout_closes_silent_and_partial_clients() -> None:
    config = make_config(**{"server.handshake_timeout": 0.3})
    async with running_server(config) as harness:
        silent = await trio.open_tcp_stream("127.0.0.1", harness.port)
        partial = await trio.open_tcp_stream("127.0.0.1", harness.port)
        await partial.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        with trio.fail_after(5):
            assert await silent.receive_some(100) == b""
            assert await partial.receive_some(100) == b""
        await silent.aclose()
        await partial.aclose()
        assert harness.sample("odin_connections_rejected_total", reason="handshake_timeout") == 2
        async with harness.client() as client:  # still serving
            assert client.hello["type"] == "hello"


async def test_oversized_request_head_gets_431() -> None:
    async with running_server() as harness:
        request = upgrade_request(headers=[("X-Big", "y" * 20_000)])
        status, _, _ = await http_exchange(harness.port, request)
        assert status == 431


async def test_http_endpoints() -> None:
    async with running_server() as harness, harness.client():
        port = harness.port
        status, headers, body = await http_exchange(
            port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        health = json.loads(body)
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert "access-control-allow-origin" not in headers  # no CORS unless configured
        assert health["status"] == "healthy" and health["healthy"] is True
        assert health["checks"]["capacity"]["current"] == 1
        assert health["checks"]["broker"]["epoch"] == harness.broker.epoch
        status, _, body = await http_exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, json.loads(body)) == (
            200,
            {"ready": True, "reasons": [], "worker": None, "workers": {"up": 1, "expected": 1}},
        )
        status, headers, body = await http_exchange(
            port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert b"odin_connections_active 1.0" in body
        for request, expected in [
            (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
            (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
            (b"OPTIONS /health HTTP/1.1\r\nHost: x\r\n\r\n", 204),
            (b"NOT HTTP AT ALL\r\n\r\n", 400),
        ]:
            assert (await http_exchange(port, request))[0] == expected, request


async def test_health_keeps_the_original_shape_that_load_scripts_read() -> None:
    async with running_server() as harness, harness.client():
        _, _, body = await http_exchange(harness.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        checks = json.loads(body)["checks"]
    capacity = checks["capacity"]
    assert (capacity["current"], capacity["max"]) == (1, harness.context.registry.max_connections)
    assert capacity["percentage"] == round(100 / capacity["max"], 2)
    assert checks["cpu"]["percentage"] >= 0
    memory = checks["memory"]
    assert 0 < memory["percentage"] < 100
    assert memory["used_mb"] == memory["rss_mb"] and memory["limit_mb"] > memory["used_mb"]


async def test_cors_headers_only_for_the_configured_origin() -> None:
    config = make_config(**{"server.cors_allow_origin": "https://dash.example"})
    async with running_server(config) as harness:
        for method in (b"GET", b"OPTIONS"):
            request = method + b" /health HTTP/1.1\r\nHost: x\r\n\r\n"
            _, headers, _ = await http_exchange(harness.port, request)
            assert headers["access-control-allow-origin"] == "https://dash.example"


async def test_cpu_percentage_is_this_process_over_the_last_interval() -> None:
    sampler = CpuSampler()
    sampler.sample(100.0)
    before = time.process_time()
    while time.process_time() - before < 0.05:  # burn 50 ms of CPU
        pass
    burned = time.process_time() - before
    sampler.sample(101.0)  # one second of "now" later: 50 ms is 5 % of a core
    assert burned * 100 - 0.01 <= sampler.percentage < burned * 100 + 5


async def test_health_counts_the_tasks_a_connection_holds_and_gives_back() -> None:
    async def tasks(harness: Harness) -> int:
        _, _, body = await http_exchange(harness.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        return int(json.loads(body)["checks"]["tasks"]["current"])

    async with running_server() as harness:
        idle = await tasks(harness)
        async with harness.client() as client:
            await client.subscribe(["BTC.trade"])
            assert await tasks(harness) > idle  # its reader and its share of the server's
        with trio.fail_after(5):
            while harness.context.registry.connections:
                await trio.sleep(0.01)  # the registry signals nothing: polled, bounded
            await trio.testing.wait_all_tasks_blocked()
        assert await tasks(harness) == idle

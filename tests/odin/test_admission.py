"""Per-client limits at the upgrade ([admission]): per address, per token subject, new
connections per address; the client's address behind trusted proxies (X-Forwarded-For,
Forwarded, the PROXY protocol); and the counts given back when connections end."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import jwt
import pytest
import trio
import trio.testing

from odin_fanout.config import ConfigError
from odin_fanout.core.proxy_protocol import ProxyHeaderError, v1_header, v2_header
from odin_fanout.server.proxy_header import read_proxy_header
from tests.helpers import (
    Harness,
    capture_logs,
    http_exchange,
    make_config,
    running_server,
    upgrade_request,
)

pytestmark = pytest.mark.trio

SECRET = "a-test-secret-of-at-least-32-bytes!!"


def bearer(subject: str) -> list[tuple[bytes, bytes]]:
    value = jwt.encode({"sub": subject}, SECRET, algorithm="HS256")
    return [(b"Authorization", f"Bearer {value}".encode())]


def forwarded(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"X-Forwarded-For", value.encode())]


def rejected(harness: Harness, reason: str) -> float:
    return harness.sample("odin_connections_rejected_total", reason=reason)


def peers(harness: Harness) -> list[str]:
    return sorted(c.peer for c in harness.context.registry.connections.values())


async def upgrade(
    harness: Harness,
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> tuple[int, dict[str, str]]:
    status, response_headers, _ = await http_exchange(
        harness.port, upgrade_request(headers=headers)
    )
    return status, response_headers


@asynccontextmanager
async def raw_connection(port: int, data: bytes) -> AsyncIterator[tuple[int, bytes]]:
    """A TCP connection that sends ``data`` first; the response's status (0: closed without
    one) and head, while the connection stays open."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in received:
                try:
                    chunk = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    chunk = b""  # closed with our bytes unread: a reset
                if not chunk:
                    break
                received += chunk
        status = int(received.split(b" ", 2)[1]) if received else 0
        yield status, received
    finally:
        await stream.aclose()


async def test_per_address_limit_and_release_after_close() -> None:
    config = make_config(**{"admission.max_per_ip": 2})
    async with running_server(config) as harness:
        with capture_logs() as logs:
            async with harness.client():
                async with harness.client():
                    status, headers = await upgrade(harness)
                    assert status == 429
                    assert headers["retry-after"] == str(config.server.retry_after)
                    assert rejected(harness, "per_ip") == 1
                # One closed: its place is back at once.
                await harness.wait_connections(1)
                async with harness.client():
                    await harness.wait_connections(2)
        refusals = [line for line in logs if line["event"] == "admission_refused"]
        assert refusals[0]["reason"] == "per_ip"
        assert refusals[0]["peer"].startswith("127.0.0.1:")
        await harness.wait_connections(0)
        # The refusals gave back what they took: a fresh pair is admitted.
        assert harness.server.admission.open_from("127.0.0.1") == 0
        async with harness.client(), harness.client():
            await harness.wait_connections(2)


async def test_a_spoofed_forwarding_header_from_an_untrusted_peer_is_ignored() -> None:
    config = make_config(**{"admission.max_per_ip": 1})
    async with running_server(config) as harness, harness.client(headers=forwarded("198.51.100.1")):
        assert peers(harness)[0].startswith("127.0.0.1:")
        status, _ = await upgrade(harness, [("X-Forwarded-For", "198.51.100.2")])
        assert status == 429


async def test_a_trusted_proxy_names_the_client_and_the_limit_is_per_client() -> None:
    config = make_config(
        **{"admission.max_per_ip": 1, "admission.trusted_proxies": "10.0.0.0/8,127.0.0.1/32"}
    )
    async with (
        running_server(config) as harness,
        harness.client(headers=forwarded("203.0.113.1")),
        harness.client(headers=forwarded("203.0.113.2, 10.1.2.3")),
    ):
        # Two clients behind the same proxy: each its own address, in the logs too.
        assert peers(harness) == ["203.0.113.1", "203.0.113.2"]
        # The right-most untrusted entry counts: what a client wrote left of it does not.
        for value in ["203.0.113.1", "6.6.6.6, 203.0.113.1", "203.0.113.2, 10.9.9.9"]:
            status, _ = await upgrade(harness, [("X-Forwarded-For", value)])
            assert status == 429, value
        assert rejected(harness, "per_ip") == 3
        status, _ = await upgrade(harness, [("X-Forwarded-For", "203.0.113.3")])
        assert status == 101


async def test_the_forwarded_header_when_configured() -> None:
    config = make_config(
        **{
            "admission.max_per_ip": 1,
            "admission.trusted_proxies": "127.0.0.1",
            "admission.forwarded_header": "forwarded",
        }
    )
    async with running_server(config) as harness:
        headers = [(b"Forwarded", b'for="[2001:db8::7]:4711";proto=https')]
        async with harness.client(headers=headers):
            assert peers(harness) == ["2001:db8::7"]
            status, _ = await upgrade(harness, [("Forwarded", "for=2001:db8::7")])
            assert status == 429
            # X-Forwarded-For is not what this proxy writes: ignored (the proxy's address).
            status, _ = await upgrade(harness, [("X-Forwarded-For", "2001:db8::7")])
            assert status == 101


async def test_per_subject_limit_after_the_token_is_checked() -> None:
    config = make_config(
        **{
            "auth.hmac_secret": SECRET,
            "admission.max_per_subject": 1,
            "admission.max_per_ip": 2,
        }
    )
    async with running_server(config) as harness:
        async with harness.client(headers=bearer("alice")):
            token = bearer("alice")[0][1].decode()
            status, headers = await upgrade(harness, [("Authorization", token)])
            assert (status, headers["retry-after"]) == (429, "5")
            assert rejected(harness, "per_subject") == 1
            # The refused upgrade gave its address's place back: bob is the second.
            async with harness.client(headers=bearer("bob")):
                await harness.wait_connections(2)
        await harness.wait_connections(0)
        async with harness.client(headers=bearer("alice")):
            await harness.wait_connections(1)
        assert harness.server.admission.open_for("alice") == 0


async def test_new_connections_per_address_are_rate_limited() -> None:
    rate = 0.01  # one a hundred seconds: the test never sees a refill
    config = make_config(
        **{"admission.new_per_ip_per_second": rate, "admission.new_per_ip_burst": 2}
    )
    async with running_server(config) as harness:
        for _ in range(2):
            status, _ = await upgrade(harness)
            assert status == 101
        status, headers = await upgrade(harness)
        assert (status, headers["retry-after"]) == (429, str(math.ceil(1 / rate)))
        assert rejected(harness, "ip_rate") == 1
        # Plain HTTP requests are not new WebSocket connections: not counted.
        status, _, _ = await http_exchange(harness.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200


def proxied(**overrides: Any) -> Any:
    return make_config(
        **{
            "admission.trusted_proxies": "127.0.0.1/32",
            "admission.proxy_protocol": True,
            "admission.max_per_ip": 1,
            **overrides,
        }
    )


async def test_proxy_protocol_v1_and_v2_name_the_client() -> None:
    async with running_server(proxied()) as harness:
        request = upgrade_request()
        v1 = v1_header("192.0.2.10", "10.0.0.1", 40000, 443)
        v2 = v2_header("2001:db8::5", "2001:db8::1", 40001, 443)
        async with (
            raw_connection(harness.port, v1 + request) as (first, _),
            raw_connection(harness.port, v2 + request) as (second, _),
        ):
            assert (first, second) == (101, 101)
            await harness.wait_connections(2)
            assert peers(harness) == ["192.0.2.10:40000", "[2001:db8::5]:40001"]
            # The same client again, through either version: over its limit.
            again = v2_header("192.0.2.10", "10.0.0.1", 40002, 443)
            async with raw_connection(harness.port, again + request) as (status, _):
                assert status == 429
            # LOCAL (the proxy's own health check): the proxy's address stands.
            async with raw_connection(harness.port, v2_header() + request) as (status, _):
                assert status == 101
        await harness.wait_connections(0)
        assert rejected(harness, "per_ip") == 1


async def test_a_bad_or_missing_proxy_header_closes_the_connection() -> None:
    async with running_server(proxied()) as harness:
        with capture_logs() as logs:
            for data in [b"PROXY TCP4 1.2.3\r\n", upgrade_request(), b"PROXY " + b"9" * 200]:
                async with raw_connection(harness.port, data) as (status, received):
                    assert (status, received) == (0, b"")
        assert rejected(harness, "proxy_header") == 3
        # One log line a second per reason at most.
        assert [line["reason"] for line in logs if line["event"] == "admission_refused"] == [
            "proxy_header"
        ]
        # And the server still serves a proper one.
        data = v1_header("192.0.2.10", "10.0.0.1", 40000, 443) + upgrade_request()
        async with raw_connection(harness.port, data) as (status, _):
            assert status == 101


async def test_a_proxy_header_from_an_untrusted_peer_is_not_believed() -> None:
    config = proxied(**{"admission.trusted_proxies": "10.0.0.0/8"})
    async with running_server(config) as harness:
        data = v1_header("192.0.2.10", "10.0.0.1", 40000, 443) + upgrade_request()
        async with raw_connection(harness.port, data) as (status, _):
            assert status == 400  # not HTTP: the header is never read as one
        async with harness.client():
            assert peers(harness)[0].startswith("127.0.0.1:")


async def test_the_header_is_read_exactly_even_in_pieces() -> None:
    client, server = trio.testing.memory_stream_pair()
    header = v2_header("192.0.2.10", "10.0.0.1", 40000, 443)
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for piece in (header[:3], header[3:20], header[20:] + b"GET /"):
                await client.send_all(piece)
                await trio.testing.wait_all_tasks_blocked()

        nursery.start_soon(send)
        with trio.fail_after(5):
            result = await read_proxy_header(server)
            assert result is not None and result.source == "192.0.2.10"
            assert await server.receive_some(100) == b"GET /"
    await client.send_all(b"PROXY TCP4 1.2.3.4 ")
    await client.send_eof()
    with trio.fail_after(5), pytest.raises(ProxyHeaderError, match="closed"):
        await read_proxy_header(server)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"admission.trusted_proxies": "10.0.0.0/33"}, "admission.trusted_proxies"),
        ({"admission.trusted_proxies": "proxy.local"}, "admission.trusted_proxies"),
        ({"admission.proxy_protocol": True}, "admission.proxy_protocol"),
        ({"admission.new_per_ip_burst": 3}, "admission.new_per_ip_burst"),
    ],
)
async def test_bad_settings_name_their_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make_config(**overrides)


async def test_counts_are_given_back_on_every_path() -> None:
    config = make_config(
        **{
            "auth.hmac_secret": SECRET,
            "auth.required": True,
            "admission.max_per_ip": 1,
            "admission.max_per_subject": 1,
        }
    )
    async with running_server(config) as harness:
        # Refused after the address's place was taken: a bad token, a bad handshake.
        status, _ = await upgrade(harness, [("Authorization", "Bearer nope")])
        assert status == 401
        status, _ = await upgrade(harness, [("Authorization", bearer("a")[0][1].decode()),
                                            ("Sec-WebSocket-Version", "8")])  # fmt: skip
        assert status in (400, 426)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(harness.client(headers=bearer("alice")))
            await harness.wait_connections(1)
        await harness.wait_connections(0)
        admission = harness.server.admission
        assert (admission.open_from("127.0.0.1"), admission.open_for("alice")) == (0, 0)
        assert admission.addresses == 0

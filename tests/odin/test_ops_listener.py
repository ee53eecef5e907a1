"""The ops listener (``server.ops_listen``): /metrics, /health and /ready on a port of their
own, plain HTTP and without CORS; the client port then serves WebSocket only. And
``server.metrics_token`` on whichever listener serves /metrics."""

from __future__ import annotations

import pytest

from odin_fanout.config import ConfigError, load_config
from odin_fanout.server.app import Listening
from tests.helpers import (
    capture_logs,
    http_exchange,
    http_get,
    make_config,
    open_client,
    running_server,
)

pytestmark = pytest.mark.trio

PATHS = ("/metrics", "/health", "/ready")


def ops_port(listening: Listening) -> int:
    assert len(listening.ops) == 1, listening.ops
    return int(listening.ops[0].rsplit(":", 1)[1])


async def get(
    port: int, path: str, headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, dict[str, str], bytes]:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode()
    return await http_exchange(port, request)


async def test_ops_paths_are_served_on_the_ops_listener_only() -> None:
    config = make_config(**{"server.ops_listen": "127.0.0.1:0", "server.cors_allow_origin": "*"})
    with capture_logs() as logs:
        async with running_server(config) as harness:
            ops = ops_port(harness.listening)
            assert ops != harness.port
            assert harness.listening.ops == [f"http://127.0.0.1:{ops}"]
            for path in PATHS:
                status, headers, body = await get(ops, path, (("Origin", "https://x.example"),))
                assert status == 200, (path, body)
                assert "access-control-allow-origin" not in headers, path
                status, _, _ = await http_get(harness.port, path)
                assert status == 404, path
            status, headers, body = await get(ops, "/metrics")
            assert b"odin_connections" in body
            assert headers["content-type"].startswith("text/plain")
            status, _, _ = await http_get(ops, "/ws")
            assert status == 404  # the ops listener never upgrades
            async with open_client(harness.port) as client:  # WebSocket on the client port
                assert client.hello["type"] == "hello"
    listening = next(entry for entry in logs if entry["event"] == "listening")
    assert listening["ops"] == [f"http://127.0.0.1:{ops}"]


async def test_without_an_ops_listener_the_client_port_serves_them_as_before() -> None:
    config = make_config(**{"server.cors_allow_origin": "*"})
    async with running_server(config) as harness:
        assert harness.listening.ops == []
        for path in PATHS:
            status, headers, _ = await http_get(harness.port, path)
            assert status == 200, path
        status, headers, _ = await http_get(harness.port, "/health")
        assert headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("ops", [True, False])
async def test_metrics_token(ops: bool) -> None:
    overrides: dict[str, object] = {"server.metrics_token": "s3cret-token"}
    if ops:
        overrides["server.ops_listen"] = "127.0.0.1:0"
    async with running_server(make_config(**overrides)) as harness:
        port = ops_port(harness.listening) if ops else harness.port
        for headers in [(), (("Authorization", "Bearer wrong"),), (("Authorization", "Basic x"),)]:
            status, answer, body = await get(port, "/metrics", headers)
            assert status == 401, headers
            assert answer["www-authenticate"] == "Bearer"
            assert b"odin_" not in body
        status, _, body = await get(port, "/metrics", (("Authorization", "Bearer s3cret-token"),))
        assert status == 200
        assert b"odin_connections" in body
        status, _, _ = await get(port, "/health")  # the token guards /metrics alone
        assert status == 200


@pytest.mark.parametrize(
    "value", ["9102", "localhost", "127.0.0.1:http", "127.0.0.1:70000", ":9102"]
)
async def test_a_bad_ops_address_is_a_config_error_naming_the_field(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"server.ops_listen": value})
    assert caught.value.problems[0].startswith("server.ops_listen: expected host:port")


async def test_ops_addresses_parse() -> None:
    for value, address in [
        ("", None),
        ("127.0.0.1:9102", ("127.0.0.1", 9102)),
        ("[::1]:0", ("::1", 0)),
        ("0.0.0.0:9102", ("0.0.0.0", 9102)),
    ]:
        config, _ = load_config(environ={}, overrides={"server.ops_listen": value})
        assert config.server.ops_address == address


async def test_the_metrics_token_is_masked_in_the_logged_configuration() -> None:
    from odin_fanout.config import as_dict

    config = make_config(**{"server.metrics_token": "s3cret-token"})
    assert "s3cret-token" not in repr(config)
    server = as_dict(config)["server"]
    assert isinstance(server, dict) and server["metrics_token"] == "***"

"""Token keys from a JWKS URL: fetched at start, refreshed when a token names a new ``kid``
(rate-limited), served stale while the key server is down, then dropped. The JWKS document
comes from a small HTTP server on loopback whose content and state the tests change."""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from odin_fanout.config import Config, ConfigError
from tests.helpers import (
    Harness,
    capture_logs,
    http_exchange,
    make_config,
    running_server,
    upgrade_request,
)

# ---- keys and tokens ------------------------------------------------------------------------


@functools.cache
def rsa_key(which: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(which: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(kid: str, which: int = 0) -> dict[str, Any]:
    public = rsa_key(which).public_key()
    return {**RSAAlgorithm.to_jwk(public, as_dict=True), "kid": kid, "use": "sig"}


def ec_jwk(kid: str, which: int = 0) -> dict[str, Any]:
    public = ec_key(which).public_key()
    return {**ECAlgorithm.to_jwk(public, as_dict=True), "kid": kid, "use": "sig"}


def rs256(kid: str, which: int = 0) -> str:
    return jwt.encode({"sub": "alice"}, rsa_key(which), algorithm="RS256", headers={"kid": kid})


def es256(kid: str, which: int = 0) -> str:
    return jwt.encode({"sub": "bob"}, ec_key(which), algorithm="ES256", headers={"kid": kid})


# ---- the key server -------------------------------------------------------------------------


@attrs.define(eq=False)
class KeyServer:
    """Answers every GET with ``document`` (JSON); counts the requests; can go down and come
    back on the same port."""

    document: dict[str, Any]
    nursery: trio.Nursery
    port: int = 0
    requests: int = 0
    _scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def up(self) -> None:
        self._scope = trio.CancelScope()
        listeners = await self.nursery.start(self._serve, self._scope)
        self.port = listeners[0].socket.getsockname()[1]

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[Any]) -> None:
        with scope:
            await trio.serve_tcp(self._handle, self.port, host="127.0.0.1",
                                 task_status=task_status)  # fmt: skip

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        async with stream:
            with trio.move_on_after(5):
                while not isinstance(event := connection.next_event(), h11.Request):
                    if event is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(4096))
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                self.requests += 1
                body = json.dumps(self.document).encode()
                headers = [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
                await stream.send_all(
                    connection.send(h11.Response(status_code=200, headers=headers))
                )
                await stream.send_all(connection.send(h11.Data(data=body)))
                await stream.send_all(connection.send(h11.EndOfMessage()))


@asynccontextmanager
async def key_server(*keys: dict[str, Any]) -> AsyncIterator[KeyServer]:
    async with trio.open_nursery() as nursery:
        server = KeyServer({"keys": list(keys)}, nursery)
        await server.up()
        yield server
        nursery.cancel_scope.cancel()


def jwks_config(url: str, **overrides: object) -> Config:
    return make_config(**{"auth.required": True, "auth.jwks_url": url, **overrides})


# ---- reading the server ---------------------------------------------------------------------


async def connect(harness: Harness, token: str) -> tuple[int, bytes]:
    """The status of an upgrade carrying ``token`` (101, or 401 and its reason)."""
    status, _, body = await http_exchange(
        harness.port, upgrade_request(headers=[("Authorization", f"Bearer {token}")])
    )
    return status, body


def fetches(harness: Harness, result: str) -> float:
    value = harness.context.metrics.registry.get_sample_value(
        "odin_auth_jwks_fetches_total", {"result": result}
    )
    return value or 0.0


def age(harness: Harness) -> float:
    samples = harness.context.metrics.samples(["odin_auth_jwks_age_seconds"])
    return float(samples[("odin_auth_jwks_age_seconds", ())])


async def wait_fetches(harness: Harness, result: str, count: float, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while fetches(harness, result) < count:
            await trio.sleep(0.01)  # fetches are counted, not signalled: polled, bounded


REFUSED = b"unauthorized: unknown_key\n"


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_tokens_are_verified_with_the_fetched_keys() -> None:
    async with (
        key_server(rsa_jwk("rsa-1"), ec_jwk("ec-1")) as keys,
        running_server(jwks_config(keys.url)) as harness,
    ):
        await wait_fetches(harness, "ok", 1)
        assert await connect(harness, rs256("rsa-1")) == (101, b"")
        assert await connect(harness, es256("ec-1")) == (101, b"")
        # Signed by another key under a known kid: a bad signature, not a refresh.
        status, body = await connect(harness, rs256("rsa-1", which=1))
        assert (status, body) == (401, b"unauthorized: invalid_signature\n")
        assert keys.requests == 1
        assert fetches(harness, "ok") == 1
        assert fetches(harness, "error") == 0
        assert 0 <= age(harness) < 5


@pytest.mark.trio
async def test_a_token_with_a_new_kid_fetches_the_rotated_keys_and_is_accepted() -> None:
    async with (
        key_server(rsa_jwk("2026-01")) as keys,
        running_server(jwks_config(keys.url)) as harness,
    ):
        await wait_fetches(harness, "ok", 1)
        with capture_logs() as logs:
            # The issuer publishes its next key and signs with it: no restart.
            keys.document = {"keys": [rsa_jwk("2026-01"), rsa_jwk("2026-02", which=1)]}
            assert await connect(harness, rs256("2026-02", which=1)) == (101, b"")
        assert keys.requests == 2
        assert await connect(harness, rs256("2026-01")) == (101, b"")
        updated = [entry for entry in logs if entry["event"] == "jwks_updated"]
        assert [entry["kids"] for entry in updated] == [["2026-01", "2026-02"]]


@pytest.mark.trio
async def test_unknown_kids_within_the_min_interval_cause_one_fetch() -> None:
    async with key_server(rsa_jwk("k1")) as keys:
        config = jwks_config(keys.url, **{"auth.jwks_min_interval": 60})
        async with running_server(config) as harness:
            await wait_fetches(harness, "ok", 1)
            assert keys.requests == 1
            assert await connect(harness, rs256("made-up-1")) == (401, REFUSED)
            assert keys.requests == 2
            # Published now, but the last kid-driven fetch was under a minute ago.
            keys.document = {"keys": [rsa_jwk("k1"), rsa_jwk("k2", which=1)]}
            assert await connect(harness, rs256("made-up-2")) == (401, REFUSED)
            assert await connect(harness, rs256("k2", which=1)) == (401, REFUSED)
            assert keys.requests == 2
            assert await connect(harness, rs256("k1")) == (101, b"")


@pytest.mark.trio
async def test_concurrent_unknown_kids_share_one_fetch() -> None:
    async with (
        key_server(rsa_jwk("k1")) as keys,
        running_server(jwks_config(keys.url)) as harness,
    ):
        await wait_fetches(harness, "ok", 1)
        keys.document = {"keys": [rsa_jwk("k1"), rsa_jwk("k2", which=1)]}
        results: list[tuple[int, bytes]] = []

        async def attempt() -> None:
            results.append(await connect(harness, rs256("k2", which=1)))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(attempt)
        assert results == [(101, b"")] * 5
        assert keys.requests == 2


@pytest.mark.trio
async def test_keys_are_served_stale_until_max_stale_then_dropped_then_fetched_again() -> None:
    async with key_server(rsa_jwk("k1")) as keys:
        config = jwks_config(
            keys.url,
            **{
                "auth.jwks_refresh": 0.2,
                "auth.jwks_min_interval": 0.1,
                "auth.jwks_max_stale": 2.0,
                "auth.jwks_timeout": 1.0,
            },
        )
        async with running_server(config) as harness:
            await wait_fetches(harness, "ok", 1)
            with capture_logs() as logs:
                keys.down()
                await wait_fetches(harness, "error", 1)
                # The key server is down: the last good keys are still used.
                assert await connect(harness, rs256("k1")) == (101, b"")
                with trio.fail_after(10):
                    while age(harness) <= 2.0:
                        await trio.sleep(0.05)  # the keys age with the clock: polled, bounded
                assert await connect(harness, rs256("k1")) == (401, REFUSED)
                ok = fetches(harness, "ok")
                await keys.up()
                await wait_fetches(harness, "ok", ok + 1)
                assert await connect(harness, rs256("k1")) == (101, b"")
                assert age(harness) < 2.0
            failed = [entry for entry in logs if entry["event"] == "jwks_fetch_failed"]
            assert len(failed) == 1  # at most once a minute, however many failed
            assert failed[0]["level"] == "warning"
            assert failed[0]["url"] == keys.url
            assert fetches(harness, "error") >= 2
            events = [entry["event"] for entry in logs]
            assert "jwks_keys_dropped" in events
            assert events.index("jwks_keys_dropped") < events.index("jwks_updated")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.trio
async def test_the_server_starts_without_keys_and_refuses_tokens_until_they_arrive() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    config = jwks_config(url, **{"auth.jwks_min_interval": 0.1})
    with capture_logs() as logs:
        async with running_server(config) as harness:
            await wait_fetches(harness, "error", 1)
            assert await connect(harness, rs256("k1")) == (401, REFUSED)
            async with trio.open_nursery() as nursery:
                keys = KeyServer({"keys": [rsa_jwk("k1")]}, nursery, port=port)
                await keys.up()
                with trio.fail_after(5):  # a token with a kid the keys lack asks for a fetch
                    while await connect(harness, rs256("k1")) != (101, b""):
                        await trio.sleep(0.05)
                assert fetches(harness, "ok") == 1
                nursery.cancel_scope.cancel()
    failed = [entry for entry in logs if entry["event"] == "jwks_fetch_failed"]
    assert failed and failed[0]["serving"] == "no keys (tokens are refused)"


@pytest.mark.trio
async def test_without_a_jwks_url_nothing_is_fetched_and_the_age_is_zero() -> None:
    config = make_config(**{"auth.hmac_secret": "a-test-secret-of-at-least-32-bytes!!"})
    async with running_server(config) as harness:
        assert age(harness) == 0
        assert fetches(harness, "ok") == fetches(harness, "error") == 0


@pytest.mark.parametrize(
    "url", ["ftp://keys.example/jwks.json", "keys.example/jwks.json", "https://", "http://h:x/"]
)
def test_a_jwks_url_must_be_http_or_https(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(**{"auth.jwks_url": url})
    assert any(problem.startswith("auth.jwks_url: ") for problem in caught.value.problems)


def test_a_jwks_url_alone_is_enough_for_required_tokens() -> None:
    config = make_config(
        **{"auth.required": True, "auth.jwks_url": "https://issuer.example/jwks.json"}
    )
    assert config.auth.has_keys
    assert (config.auth.jwks_refresh, config.auth.jwks_min_interval) == (300, 30)
    assert (config.auth.jwks_max_stale, config.auth.jwks_timeout) == (86400, 5)

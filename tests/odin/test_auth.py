"""Tokens at the upgrade, namespaces on subscribe and replay, and expiry on open connections:
a server configured with ``[auth]``, reached by real WebSocket clients."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio

from odin_fanout.config import Config
from tests.helpers import (
    capture_logs,
    http_exchange,
    make_config,
    running_server,
    upgrade_request,
)

pytestmark = pytest.mark.trio

SECRET = "a-test-secret-of-at-least-32-bytes!!"
NAMESPACES = "PRIV.*=token,*.balances=deny"


def token(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", **claims}, SECRET, algorithm="HS256")


def auth_config(**overrides: object) -> Config:
    return make_config(**{"auth.hmac_secret": SECRET, "auth.namespaces": NAMESPACES, **overrides})


def bearer(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {value}".encode())]


async def test_an_unconfigured_server_serves_everyone_everything() -> None:
    async with running_server() as harness, harness.client() as client:
        ack = await client.subscribe(["*.*"])
        assert ack["type"] == "subscription_ack"


async def test_a_bad_token_is_refused_before_the_upgrade_with_its_reason() -> None:
    async with running_server(auth_config()) as harness:
        with capture_logs() as logs:
            for value, reason in [
                ("not-a-jwt", "malformed"),
                (jwt.encode({"sub": "x"}, "another-secret-of-at-least-32-bytes!", "HS256"),
                 "invalid_signature"),
                (token(exp=int(time.time()) - 60), "expired"),
                (jwt.encode({"sub": "x"}, "", algorithm="none"), "algorithm"),
            ]:  # fmt: skip
                status, headers, body = await http_exchange(
                    harness.port, upgrade_request(headers=[("Authorization", f"Bearer {value}")])
                )
                assert (status, body) == (401, f"unauthorized: {reason}\n".encode())
                assert f'error_description="{reason}"' in headers["www-authenticate"]
        refused = [entry for entry in logs if entry["event"] == "auth_refused"]
        assert [entry["reason"] for entry in refused] == [
            "malformed", "invalid_signature", "expired", "algorithm"
        ]  # fmt: skip
        assert all("Bearer" not in str(entry) for entry in refused)  # never the token
        registry = harness.context.metrics.registry
        sample = registry.get_sample_value
        assert sample("odin_connections_rejected_total", {"reason": "unauthorized"}) == 4
        assert sample("odin_auth_refused_total", {"reason": "expired"}) == 1


async def test_without_a_token_only_public_channels_are_served() -> None:
    async with running_server(auth_config()) as harness, harness.client() as client:
        assert (await client.subscribe(["BTC.trade"]))["type"] == "subscription_ack"
        error = await client.subscribe(["PRIV.trade"])
        assert error["code"] == "FORBIDDEN"
        assert "'PRIV.trade'" in error["message"] and "'PRIV.*'" in error["message"]
        # A pattern is checked for every channel it could receive: *.* would get PRIV ones.
        assert (await client.subscribe(["*.*"]))["code"] == "FORBIDDEN"
        assert (await client.subscribe(["BTC.balances"]))["code"] == "FORBIDDEN"
        # Nothing of a refused request was done; the connection is still there.
        ack = await client.subscribe(["ETH.trade"])
        assert ack["subscribed"] == ["ETH.trade"] and ack["count"] == 2
        registry = harness.context.metrics.registry
        assert registry.get_sample_value("odin_auth_refused_total", {"reason": "forbidden"}) == 3


async def test_a_token_opens_its_channels_however_it_is_passed() -> None:
    config = auth_config(**{"auth.query_token": True})
    granted = token(channels=["PRIV.*"])
    async with running_server(config) as harness:
        ways: list[dict[str, Any]] = [
            {"headers": bearer(granted)},
            {"subprotocols": [f"odin.token.{granted}"]},
            {"resource": f"/ws?token={granted}"},
        ]
        for way in ways:
            async with harness.client(**way) as client:
                ack = await client.subscribe(["PRIV.trade", "PRIV.*"])
                assert ack["type"] == "subscription_ack", way
                # The token allows PRIV channels, not denied ones.
                assert (await client.subscribe(["BTC.balances"]))["code"] == "FORBIDDEN"
                seq = harness.publish("PRIV.trade", {"n": 1})
                (event,) = await client.events(1)
                assert event["seq"] == seq
        # A token's subprotocol is never echoed: only odin.v1 is.
        status, headers, _ = await http_exchange(
            harness.port,
            upgrade_request(headers=[("Sec-WebSocket-Protocol", f"odin.v1, odin.token.{granted}")]),
        )
        assert (status, headers["sec-websocket-protocol"]) == (101, "odin.v1")


async def test_the_query_token_is_ignored_unless_enabled() -> None:
    granted = token(channels=["PRIV.*"])
    async with (
        running_server(auth_config()) as harness,
        harness.client(resource=f"/ws?token={granted}") as client,
    ):
        assert (await client.subscribe(["PRIV.trade"]))["code"] == "FORBIDDEN"


async def test_a_required_token_refuses_anonymous_connections() -> None:
    async with running_server(auth_config(**{"auth.required": True})) as harness:
        status, _, body = await http_exchange(harness.port, upgrade_request())
        assert (status, body) == (401, b"unauthorized: missing\n")
        async with harness.client(headers=bearer(token())) as client:
            assert (await client.subscribe(["BTC.trade"]))["type"] == "subscription_ack"


async def test_a_replay_obeys_the_namespaces() -> None:
    async with running_server(auth_config()) as harness, harness.client() as client:
        reply = await client.request(
            {"type": "replay", "data": {"channels": ["PRIV.trade"], "since": 0}}, "replay_complete"
        )
        assert reply["code"] == "FORBIDDEN"


async def test_a_connection_is_closed_when_its_token_expires() -> None:
    # Expiry is checked on the wall clock the token uses: two seconds from now (leeway 0).
    config = auth_config(**{"auth.leeway": 0})
    expires = int(time.time()) + 2
    with capture_logs() as logs:
        async with running_server(config) as harness:
            async with (
                harness.client(headers=bearer(token(exp=expires))) as short,
                harness.client(headers=bearer(token(exp=expires + 3600))) as long,
            ):
                await short.subscribe(["BTC.trade"])
                await long.subscribe(["BTC.trade"])
                with trio.fail_after(10):
                    _, code, reason = await short.until_closed(timeout=10)
                assert (code, reason) == (4010, "token expired")
                assert time.time() >= expires
                # The other connection is untouched.
                seq = harness.publish("BTC.trade", {"n": 1})
                (event,) = await long.events(1)
                assert event["seq"] == seq
            registry = harness.context.metrics.registry
            sample = registry.get_sample_value
            assert sample("odin_connections_closed_total", {"reason": "token_expired"}) == 1
    expired = [entry for entry in logs if entry["event"] == "token_expired"]
    assert [entry["sub"] for entry in expired] == ["alice"]
    opened = [entry.get("sub") for entry in logs if entry["event"] == "conn_open"]
    assert opened == ["alice", "alice"]  # who, in the log; never the token


# ---- in-band: the auth message, token_expiring and refresh ----------------------------------


async def test_a_v1_client_may_send_its_token_as_its_first_message() -> None:
    config = auth_config(**{"auth.required": True})
    async with running_server(config) as harness, harness.client() as client:
        ok = await client.request(
            {"type": "auth", "id": 7, "data": {"token": token(channels=["PRIV.*"])}}, "auth_ok"
        )
        assert (ok["type"], ok["sub"], ok["id"]) == ("auth_ok", "alice", 7)
        assert (await client.subscribe(["PRIV.trade"]))["type"] == "subscription_ack"
        # Only as the first message: later, refresh is the way.
        late = await client.request({"type": "auth", "data": {"token": token()}}, "auth_ok")
        assert late["code"] == "INVALID_MESSAGE"


async def test_a_required_token_that_does_not_come_first_closes_the_connection() -> None:
    config = auth_config(**{"auth.required": True, "server.handshake_timeout": 0.5})
    async with running_server(config) as harness:
        async with harness.client() as client:
            await client.send({"type": "subscribe", "data": {"channels": ["BTC.trade"]}})
            _, code, reason = await client.until_closed()
            assert (code, reason) == (4011, "authentication required")
        async with harness.client() as silent:  # says nothing at all
            _, code, reason = await silent.until_closed()
            assert (code, reason) == (4011, "authentication required")
        async with harness.client() as forged:
            bad = jwt.encode({"sub": "x"}, "another-secret-of-at-least-32-bytes!", "HS256")
            await forged.send({"type": "auth", "data": {"token": bad}})
            _, code, reason = await forged.until_closed()
            assert (code, reason) == (4012, "token invalid: invalid_signature")
        registry = harness.context.metrics.registry
        assert registry.get_sample_value("odin_connections_closed_total", {"reason": "auth"}) == 3


async def test_a_client_told_its_token_is_expiring_refreshes_and_stays() -> None:
    # The notice comes 1.5 s before exp, at least 2.5 s from now: after the subscribe's ack.
    config = auth_config(**{"auth.leeway": 0, "auth.expiry_notice": 1.5})
    soon = int(time.time()) + 4
    async with (
        running_server(config) as harness,
        harness.client(headers=bearer(token(exp=soon, channels=["PRIV.*"]))) as refreshing,
        harness.client(headers=bearer(token(exp=soon))) as lapsing,
    ):
        await refreshing.subscribe(["PRIV.trade"])
        warning = await refreshing.expect("token_expiring", timeout=10)
        assert warning["expires_at"] == soon * 1000 and 0 < warning["in_ms"] <= 1500
        # Another subject, or one that would not allow PRIV.trade: refused, nothing changes.
        other = jwt.encode({"sub": "mallory", "channels": ["PRIV.*"]}, SECRET, "HS256")
        refused = await refreshing.request({"type": "refresh", "data": {"token": other}}, "auth_ok")
        assert refused["code"] == "UNAUTHORIZED"
        narrower = token(exp=soon + 3600, channels=["BTC.*"])
        refused = await refreshing.request(
            {"type": "refresh", "data": {"token": narrower}}, "auth_ok"
        )
        assert refused["code"] == "FORBIDDEN"
        fresh = token(exp=soon + 3600, channels=["PRIV.*"])
        ok = await refreshing.request({"type": "refresh", "data": {"token": fresh}}, "auth_ok")
        assert ok["expires_at"] == (soon + 3600) * 1000
        # The one that did not refresh is closed at its expiry; the other goes on.
        _, code, _ = await lapsing.until_closed(timeout=10)
        assert code == 4010
        seq = harness.publish("PRIV.trade", {"n": 1})
        (event,) = await refreshing.events(1)
        assert event["seq"] == seq


async def test_a_refresh_needs_a_token_to_replace() -> None:
    async with running_server(auth_config()) as harness, harness.client() as client:
        reply = await client.request({"type": "refresh", "data": {"token": token()}}, "auth_ok")
        assert reply["code"] == "UNAUTHORIZED"


async def test_a_token_sent_in_band_counts_against_its_users_limit() -> None:
    config = auth_config(**{"auth.required": True, "admission.max_per_subject": 1})
    async with running_server(config) as harness, harness.client() as first:
        await first.request({"type": "auth", "data": {"token": token()}}, "auth_ok")
        async with harness.client() as second:
            await second.send({"type": "auth", "data": {"token": token()}})
            _, code, reason = await second.until_closed()
            assert (code, reason) == (1008, "too many connections for this user")
        # The first is untouched.
        assert (await first.subscribe(["BTC.trade"]))["type"] == "subscription_ack"


async def test_secrets_are_masked_in_the_logged_configuration() -> None:
    from odin_fanout.config import as_dict

    config = make_config(
        **{
            "auth.hmac_secret": SECRET,
            "auth.jwks_url": "https://reader:pa55word@auth.example:8443/jwks.json",
        }
    )
    shown = str(as_dict(config))
    assert SECRET not in shown and "pa55word" not in shown
    auth = as_dict(config)["auth"]
    assert isinstance(auth, dict)
    assert auth["hmac_secret"] == "***"
    assert auth["jwks_url"] == "https://reader:***@auth.example:8443/jwks.json"

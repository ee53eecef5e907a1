"""The Python client against a real server in-process when the server says no: a 503 or 429
with Retry-After is waited out, a refused token ends the client (a fixed token at once, a
token provider after a few refusals in a row), an expired one only reconnects."""

from __future__ import annotations

import email.utils
from typing import Any

import jwt
import pytest
import trio

import odin_fanout.client
from odin_fanout.client import AuthenticationError, Event, Refusal
from odin_fanout.client.client import retry_after_seconds
from odin_fanout.protocol.close_codes import CloseCode
from tests.client.test_client import SECRET, events, kick, subscribed, url
from tests.helpers import Harness, make_config, running_server

pytestmark = pytest.mark.trio

OTHER_SECRET = "another-secret-of-at-least-32-bytes!"


def token(secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": "alice", "channels": ["*.*"], **claims}, secret, algorithm="HS256")


class Place:
    """A connection that holds the server's one place (in a task of the server's nursery, so
    that the test can give it up while its client stays open)."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self._release = trio.Event()

    async def take(self) -> None:
        taken = trio.Event()

        async def hold() -> None:
            async with self.harness.client():
                taken.set()
                await self._release.wait()

        self.harness.nursery.start_soon(hold)
        with trio.fail_after(5):
            await taken.wait()

    async def give_up(self) -> None:
        self._release.set()
        await self.harness.wait_connections(0)


def auth_config(**overrides: object) -> Any:
    return make_config(**{"auth.hmac_secret": SECRET, "auth.required": True, **overrides})


@pytest.mark.parametrize(
    ("setting", "status", "reason"),
    [
        ("server.max_connections", 503, "server at capacity"),
        ("admission.max_per_ip", 429, "too many connections from this address"),
    ],
)
async def test_a_refusal_with_retry_after_is_waited_out(
    setting: str, status: int, reason: str
) -> None:
    # The backoff alone would try again within 20 ms, and again, and again.
    config = make_config(**{setting: 1, "server.retry_after": 1})
    async with running_server(config) as harness:
        place = Place(harness)
        await place.take()
        async with odin_fanout.client.connect(
            url(harness), min_backoff=0.01, max_backoff=0.02
        ) as client:
            with trio.fail_after(5):
                await client.wait_refusals(1)
            refused_at = trio.current_time()
            assert client.last_refusal == Refusal(status, 1.0, reason)
            assert client.last_wait is not None
            assert 1.0 <= client.last_wait <= 1.1
            assert not client.connected
            await place.give_up()  # the place is free at once: only the wait holds it back
            with trio.fail_after(5):
                await client.wait_connected()
            assert trio.current_time() - refused_at >= 1.0
            assert (client.attempts, client.refusals, client.connections) == (2, 1, 1)
            subscription = await subscribed(harness, client, "BTC.trade")
            seq = harness.publish("BTC.trade", {"n": 1})
            assert [e.seq for e in await events(subscription, 1)] == [seq]


async def test_a_long_retry_after_is_capped() -> None:
    config = make_config(**{"server.max_connections": 1, "server.retry_after": 3600})
    async with running_server(config) as harness:
        place = Place(harness)
        await place.take()
        async with odin_fanout.client.connect(
            url(harness), min_backoff=0.01, max_retry_after=0.05
        ) as client:
            with trio.fail_after(5):
                await client.wait_refusals(1)
            assert client.last_refusal == Refusal(503, 3600.0, "server at capacity")
            assert client.last_wait is not None
            assert 0.05 <= client.last_wait <= 0.055
            await place.give_up()
            with trio.fail_after(5):
                await client.wait_connected()


async def test_a_refusal_without_retry_after_backs_off_and_goes_on_trying() -> None:
    config = make_config(**{"server.require_origin": True})  # 403 to every non-browser
    async with (
        running_server(config) as harness,
        odin_fanout.client.connect(url(harness), min_backoff=0.01, max_backoff=0.02) as client,
    ):
        with trio.fail_after(5):
            await client.wait_refusals(3)
        assert client.last_refusal == Refusal(403, None, "origin not allowed")
        assert client.last_wait is not None
        assert client.last_wait <= 0.02
        assert client.error is None


async def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    assert retry_after_seconds([(b"retry-after", b"5")], 0) == 5.0
    assert retry_after_seconds([(b"Retry-After", b" 12 ")], 0) == 12.0
    date = email.utils.formatdate(1_000_030, usegmt=True).encode()
    assert retry_after_seconds([(b"retry-after", date)], 1_000_000) == 30.0
    assert retry_after_seconds([(b"retry-after", date)], 1_000_100) == 0.0
    assert retry_after_seconds([(b"retry-after", b"soon")], 0) is None
    assert retry_after_seconds([(b"content-type", b"text/plain")], 0) is None


async def test_a_fixed_token_refused_on_the_upgrade_ends_the_client() -> None:
    bad = token(OTHER_SECRET)
    opened: list[tuple[odin_fanout.client.Client, odin_fanout.client.Subscription]] = []

    async def consume(harness: Harness) -> None:
        # The error the subscription raises comes out of the block as itself.
        async with odin_fanout.client.connect(url(harness), token=bad, min_backoff=0.01) as client:
            subscription = client.subscribe("BTC.trade")
            opened.append((client, subscription))
            async for _ in subscription:
                pytest.fail("no event can come")

    async with running_server(auth_config()) as harness:
        with pytest.raises(AuthenticationError) as caught:
            await consume(harness)
        ((client, subscription),) = opened
        error = caught.value
        assert (error.code, error.status, error.close_code, error.refusals) == (
            "TOKEN_INVALID",
            401,
            None,
            1,
        )
        assert error.message == "unauthorized: invalid_signature"
        assert isinstance(error, odin_fanout.client.SubscriptionError)
        # It gave up: one attempt, and everything the block could ask says so.
        assert (client.attempts, client.connections, client.auth_refusals) == (1, 0, 1)
        assert client.error is error
        assert client.last_refusal is not None
        assert client.last_refusal.status == 401
        with pytest.raises(AuthenticationError):
            await client.wait_connected()
        with pytest.raises(AuthenticationError):
            await client.wait_attempts(2)
        with pytest.raises(AuthenticationError):
            client.subscribe("ETH.trade")
        with pytest.raises(AuthenticationError):
            await subscription.wait_active()


async def test_no_token_where_one_is_required_ends_the_client_with_4011() -> None:
    async with (
        running_server(auth_config()) as harness,
        odin_fanout.client.connect(url(harness), min_backoff=0.01) as client,
    ):
        subscription = client.subscribe("BTC.trade")  # not `auth` first: closed with 4011
        with trio.fail_after(5), pytest.raises(AuthenticationError) as caught:
            await anext(subscription)
        error = caught.value
        assert (error.code, error.close_code, error.status) == (
            "AUTH_REQUIRED",
            CloseCode.AUTH_REQUIRED,
            None,
        )
        assert error.message == "authentication required"
        assert client.last_close == (CloseCode.AUTH_REQUIRED, "authentication required")
        assert (client.attempts, client.connections) == (1, 1)


async def test_a_fixed_token_closed_with_4012_ends_the_client() -> None:
    async with (
        running_server(auth_config()) as harness,
        odin_fanout.client.connect(url(harness), token=token(), min_backoff=0.01) as client,
    ):
        first = await subscribed(harness, client, "BTC.trade")
        second = await subscribed(harness, client, "ETH.*")
        await kick(harness, client, CloseCode.TOKEN_INVALID)  # as an `auth` refused closes
        for subscription in (first, second):
            with trio.fail_after(5), pytest.raises(AuthenticationError) as caught:
                await anext(subscription)
            assert caught.value.code == "TOKEN_INVALID"
            assert caught.value.close_code == CloseCode.TOKEN_INVALID
            assert caught.value.message == "closed by operator"
        assert (client.attempts, client.connections) == (1, 1)
        assert not client.connected


@pytest.mark.parametrize("limit", [1, 3])
async def test_a_provider_is_asked_again_until_its_refusals_in_a_row_reach_the_limit(
    limit: int,
) -> None:
    calls: list[int] = []

    async def provider() -> str:
        calls.append(len(calls) + 1)
        await trio.lowlevel.checkpoint()
        return token(OTHER_SECRET, n=len(calls))

    async with (
        running_server(auth_config()) as harness,
        odin_fanout.client.connect(
            url(harness), token=provider, min_backoff=0.01, max_auth_refusals=limit
        ) as client,
    ):
        subscription = client.subscribe("BTC.trade")
        with trio.fail_after(5), pytest.raises(AuthenticationError) as caught:
            await anext(subscription)
        assert caught.value.refusals == limit
        assert caught.value.status == 401
        assert len(calls) == limit
        assert client.attempts == limit
        assert client.auth_refusals == limit


async def test_a_provider_that_comes_up_with_a_good_token_in_time_goes_on() -> None:
    calls: list[int] = []

    async def provider() -> str:
        calls.append(len(calls) + 1)
        await trio.lowlevel.checkpoint()
        return token(OTHER_SECRET if len(calls) <= 2 else SECRET)

    async with (
        running_server(auth_config()) as harness,
        odin_fanout.client.connect(url(harness), token=provider, min_backoff=0.01) as client,
    ):
        subscription = client.subscribe("BTC.trade")
        with trio.fail_after(5):
            await subscription.wait_active()
        assert (len(calls), client.attempts, client.refusals) == (3, 3, 2)
        assert client.auth_refusals == 0
        assert client.error is None
        seq = harness.publish("BTC.trade", {"n": 1})
        assert [e.seq for e in await events(subscription, 1)] == [seq]


async def test_an_expired_token_only_reconnects_even_a_fixed_one() -> None:
    fixed = token()
    async with (
        running_server(auth_config()) as harness,
        odin_fanout.client.connect(url(harness), token=fixed, min_backoff=0.01) as client,
    ):
        subscription = await subscribed(harness, client, "BTC.trade")
        first = harness.publish("BTC.trade", {"n": 0})
        received = await events(subscription, 1)
        await kick(harness, client, CloseCode.TOKEN_EXPIRED)
        missed = harness.publish("BTC.trade", {"n": 1})
        received += await events(subscription, 1)
        assert [e.seq for e in received] == [first, missed]
        assert all(isinstance(e, Event) for e in received)
        assert client.last_close is not None
        assert client.last_close[0] == CloseCode.TOKEN_EXPIRED
        assert (client.connections, client.auth_refusals, client.error) == (2, 0, None)

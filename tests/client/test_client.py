"""The Python client against a real server in-process: live events, positions, reconnects
that recover exactly what was missed, drains, gaps, positions too old, and tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import trio
import trio.lowlevel

import odin_fanout.client
from odin_fanout.client import Event, Gap, Item, NotRecovered, Position, Subscription
from odin_fanout.protocol.close_codes import CloseCode
from tests.helpers import Harness, make_broker, make_config, running_server

pytestmark = pytest.mark.trio

SECRET = "a-test-secret-of-at-least-32-bytes!!"


def url(harness: Harness) -> str:
    return f"ws://127.0.0.1:{harness.port}/ws"


class TokenGate:
    """A token provider the test lets through one connection at a time: the client waits in
    it between connections, so the test knows when the client is offline."""

    def __init__(self, token: str | None = None, allowed: int = 1) -> None:
        self.token = token
        self.calls = 0
        self.allowed = allowed
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def __call__(self) -> str | None:
        self.calls += 1
        self._notify()
        while self.calls > self.allowed:
            await self._changed.wait()
        return self.token

    def allow(self) -> None:
        self.allowed += 1
        self._notify()

    async def wait_calls(self, count: int) -> None:
        while self.calls < count:
            await self._changed.wait()


async def take(items: AsyncIterator[Item], count: int, timeout: float = 5) -> list[Item]:
    found: list[Item] = []
    with trio.fail_after(timeout):
        while len(found) < count:
            found.append(await anext(items))
    return found


async def events(items: AsyncIterator[Item], count: int, timeout: float = 5) -> list[Event]:
    found = await take(items, count, timeout)
    assert all(isinstance(item, Event) for item in found), found
    return [item for item in found if isinstance(item, Event)]


def linked(received: list[Event], start: dict[str, int]) -> list[str]:
    """Per channel, each event's prev is the previous seq: the problems found."""
    last = dict(start)
    problems = []
    for event in received:
        if event.channel in last and event.prev != last[event.channel]:
            problems.append(f"{event.channel}: prev {event.prev} after {last[event.channel]}")
        last[event.channel] = event.seq
    return problems


async def kick(
    harness: Harness, client: odin_fanout.client.Client, code: int = CloseCode.KICKED
) -> None:
    """Close the client's connection from the server side, as an operator's kick does."""
    with trio.fail_after(5):
        await client.wait_connected()
    assert client.connection_id is not None
    connection = harness.context.registry.connections[client.connection_id]
    connection.request_close(code, "closed by operator", "operator")


async def subscribed(
    harness: Harness, client: odin_fanout.client.Client, *patterns: str
) -> Subscription:
    """A subscription the server has acknowledged."""
    subscription = client.subscribe(*patterns)
    with trio.fail_after(5):
        await subscription.wait_active()
    return subscription


async def test_live_events_of_a_pattern_and_their_positions() -> None:
    async with (
        running_server() as harness,
        odin_fanout.client.connect(url(harness), min_backoff=0.01) as client,
    ):
        subscription = await subscribed(harness, client, "BTC.*")
        sent = [
            harness.publish("BTC.trade", {"n": 1}),
            harness.publish("ETH.trade", {"n": 2}),  # not covered
            harness.publish("BTC.social", {"n": 3}),
            harness.publish("BTC.trade", {"type": "price:update", "n": 4}),
        ]
        got = await events(subscription, 3)
        assert [(e.channel, e.seq) for e in got] == [
            ("BTC.trade", sent[0]),
            ("BTC.social", sent[2]),
            ("BTC.trade", sent[3]),
        ]
        assert got[2].prev == sent[0]
        assert got[2].type == "price:update"
        assert got[2].data == {"type": "price:update", "n": 4}
        assert got[2].epoch == harness.broker.epoch
        assert client.positions["BTC.trade"] == Position(harness.broker.epoch, sent[3])
        assert client.positions["BTC.social"] == Position(harness.broker.epoch, sent[2])
        assert "ETH.trade" not in client.positions


async def test_several_subscriptions_share_one_connection() -> None:
    async with (
        running_server() as harness,
        odin_fanout.client.connect(url(harness), min_backoff=0.01) as client,
    ):
        trades = await subscribed(harness, client, "*.trade")
        btc = await subscribed(harness, client, "BTC.*")
        assert len(harness.context.registry.connections) == 1
        a = harness.publish("BTC.trade", {"n": 1})
        b = harness.publish("ETH.trade", {"n": 2})
        c = harness.publish("BTC.social", {"n": 3})
        assert [e.seq for e in await events(trades, 2)] == [a, b]
        assert [e.seq for e in await events(btc, 2)] == [a, c]


async def test_a_lost_connection_is_recovered_exactly_once_and_in_order() -> None:
    gate = TokenGate()
    async with (
        running_server() as harness,
        odin_fanout.client.connect(url(harness), token=gate, min_backoff=0.01) as client,
    ):
        subscription = await subscribed(harness, client, "BTC.*", "ETH.trade")
        # Recovery needs a position per channel: a pattern's channels are known by their events.
        first = ["BTC.trade", "ETH.trade", "BTC.social"]
        before = [harness.publish(ch, {"n": n}) for n, ch in enumerate(first)]
        received = await events(subscription, 3)
        await kick(harness, client)
        await gate.wait_calls(2)  # offline, waiting for its next connection's token
        assert client.last_close == (CloseCode.KICKED, "closed by operator")
        channels = ["BTC.trade", "ETH.trade", "BTC.social", "SOL.trade"]
        missed = [(ch, harness.publish(ch, {"n": n})) for n, ch in enumerate(channels * 5)]
        gate.allow()
        wanted = [(ch, seq) for ch, seq in missed if ch != "SOL.trade"]
        received += await events(subscription, len(wanted))
        # Each channel's missed events once, in order (a replay goes channel by channel).
        for channel in ["BTC.trade", "ETH.trade", "BTC.social"]:
            got = [e.seq for e in received[3:] if e.channel == channel]
            assert got == [seq for ch, seq in wanted if ch == channel]
        assert len(received[3:]) == len(wanted)
        assert client.connections == 2
        # Then live again, still linked.
        live = harness.publish("BTC.trade", {"n": 99})
        received += await events(subscription, 1)
        assert received[-1].seq == live
        assert linked(received, {}) == []
        assert [e.seq for e in received[:3]] == before


async def test_reconnects_while_events_keep_coming() -> None:
    async with (
        running_server() as harness,
        odin_fanout.client.connect(url(harness), min_backoff=0.01, max_backoff=0.05) as client,
    ):
        subscription = await subscribed(harness, client, "BTC.trade")
        published: list[int] = []
        received: list[Event] = []
        for round_ in range(3):
            for n in range(20):
                published.append(harness.publish("BTC.trade", {"round": round_, "n": n}))
                if n == 10:
                    await kick(harness, client)
                await trio.lowlevel.checkpoint()
            received += await events(subscription, len(published) - len(received))
        assert [e.seq for e in received] == published
        assert linked(received, {}) == []
        assert client.connections >= 3


async def test_a_drain_is_honoured_with_its_after_ms() -> None:
    # The backoff alone would wait 20 s: reconnecting in time means after_ms was used.
    async with (
        running_server() as harness,
        odin_fanout.client.connect(url(harness), min_backoff=20, max_backoff=30) as client,
    ):
        subscription = await subscribed(harness, client, "BTC.trade")
        first = harness.publish("BTC.trade", {"n": 0})
        received = await events(subscription, 1)
        with trio.fail_after(5):
            await client.wait_connected()
        assert client.connection_id is not None
        connection = harness.context.registry.connections[client.connection_id]
        connection.request_close(
            CloseCode.GOING_AWAY, "server shutting down", "shutdown", reconnect_after_ms=50
        )
        missed = [harness.publish("BTC.trade", {"n": n}) for n in range(1, 4)]
        received += await events(subscription, 3, timeout=5)
        assert [e.seq for e in received] == [first, *missed]
        assert client.last_close == (CloseCode.GOING_AWAY, "server shutting down")
        assert client.connections == 2


async def test_a_gap_the_server_announces_is_yielded() -> None:
    async with (
        running_server() as harness,
        odin_fanout.client.connect(url(harness), min_backoff=0.01) as client,
    ):
        subscription = await subscribed(harness, client, "BTC.trade")
        first = harness.publish("BTC.trade", {"n": 0})
        bad = harness.publish("BTC.trade", b"not json")
        after = harness.publish("BTC.trade", {"n": 2})
        items = await take(subscription, 3)
        assert isinstance(items[0], Event)
        assert items[0].seq == first
        assert items[1] == Gap("BTC.trade", bad, bad, "invalid_payload")
        assert isinstance(items[2], Event)
        assert (items[2].seq, items[2].prev) == (after, bad)


async def test_a_position_too_old_is_not_recovered_and_the_latest_value_follows() -> None:
    config = make_config(**{"history.max_messages": 5})
    gate = TokenGate()
    async with (
        running_server(config, make_broker(config)) as harness,
        odin_fanout.client.connect(url(harness), token=gate, min_backoff=0.01) as client,
    ):
        subscription = await subscribed(harness, client, "BTC.trade")
        first = harness.publish("BTC.trade", {"n": 0})
        assert [e.seq for e in await events(subscription, 1)] == [first]
        await kick(harness, client)
        await gate.wait_calls(2)
        sent = [harness.publish("BTC.trade", {"n": n}) for n in range(1, 21)]
        gate.allow()
        items = await take(subscription, 2)
        assert items[0] == NotRecovered("BTC.trade", "history_expired")
        assert isinstance(items[1], Event)
        assert items[1].seq == sent[-1]
        assert items[1].data == {"n": 20}
        live = harness.publish("BTC.trade", {"n": 21})
        (event,) = await events(subscription, 1)
        assert (event.seq, event.prev) == (live, sent[-1])


async def test_a_full_buffer_drops_the_oldest_and_says_so() -> None:
    async with (
        running_server() as harness,
        odin_fanout.client.connect(url(harness), min_backoff=0.01) as client,
    ):
        small = client.subscribe("BTC.trade", buffer_size=3)
        everything = await subscribed(harness, client, "BTC.trade")
        with trio.fail_after(5):
            await small.wait_active()
        sent = [harness.publish("BTC.trade", {"n": n}) for n in range(10)]
        await events(everything, 10)  # the client has read them all by now
        items = await take(small, 4)
        assert items[0] == Gap("BTC.trade", sent[0], sent[6], "client_overflow")
        assert [e.seq for e in items[1:] if isinstance(e, Event)] == sent[7:]


async def test_a_token_provider_is_called_for_every_connection() -> None:
    config = make_config(**{"auth.hmac_secret": SECRET, "auth.namespaces": "PRIV.*=token"})
    calls: list[int] = []

    async def provider() -> str:
        calls.append(len(calls) + 1)
        await trio.lowlevel.checkpoint()
        claims: dict[str, Any] = {"sub": "alice", "channels": ["PRIV.*"], "n": len(calls)}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    async with (
        running_server(config) as harness,
        odin_fanout.client.connect(url(harness), token=provider, min_backoff=0.01) as client,
    ):
        subscription = await subscribed(harness, client, "PRIV.trade")
        first = harness.publish("PRIV.trade", {"n": 0})
        assert [e.seq for e in await events(subscription, 1)] == [first]
        assert calls == [1]
        await kick(harness, client)
        second = harness.publish("PRIV.trade", {"n": 1})
        assert [e.seq for e in await events(subscription, 1)] == [second]
        assert calls == [1, 2]


async def test_a_refused_subscription_raises_from_its_iterator() -> None:
    config = make_config(**{"auth.hmac_secret": SECRET, "auth.namespaces": "PRIV.*=token"})
    token = jwt.encode({"sub": "alice", "channels": []}, SECRET, algorithm="HS256")
    async with (
        running_server(config) as harness,
        odin_fanout.client.connect(url(harness), token=token, min_backoff=0.01) as client,
    ):
        refused = client.subscribe("PRIV.trade")
        with trio.fail_after(5), pytest.raises(odin_fanout.client.SubscriptionError) as caught:
            await anext(refused)
        assert caught.value.code == "FORBIDDEN"


async def test_leaving_the_block_closes_the_connection_and_ends_iterators() -> None:
    async with running_server() as harness:
        async with odin_fanout.client.connect(url(harness), min_backoff=0.01) as client:
            subscription = await subscribed(harness, client, "BTC.trade")
            await harness.wait_connections(1)
        await harness.wait_connections(0)
        with trio.fail_after(1):
            assert [item async for item in subscription] == []


async def test_token_expiring_is_answered_with_a_refresh() -> None:
    import time

    config = make_config(**{"auth.hmac_secret": SECRET, "auth.namespaces": "PRIV.*=token"})
    calls: list[int] = []
    refreshed = trio.Event()

    async def provider() -> str:
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            refreshed.set()
        await trio.lowlevel.checkpoint()
        # The first expires within the warning window: token_expiring comes at once.
        lifetime = 20 if len(calls) == 1 else 3600
        claims = {"sub": "alice", "channels": ["PRIV.*"], "exp": int(time.time()) + lifetime}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    async with (
        running_server(config) as harness,
        odin_fanout.client.connect(url(harness), token=provider, min_backoff=0.01) as client,
    ):
        subscription = await subscribed(harness, client, "PRIV.trade")
        with trio.fail_after(5):
            await refreshed.wait()
            await client.wait_tokens_taken(1)  # the server's auth_ok for the refresh
        assert client.token_expires_at is not None
        assert client.token_expires_at > time.time() + 600
        seq = harness.publish("PRIV.trade", {"n": 1})
        assert [e.seq for e in await events(subscription, 1)] == [seq]
        assert client.connections == 1

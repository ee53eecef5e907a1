"""What a process asks its broker for: the fewest filters that deliver every channel its
clients subscribe to, and no other; keys that lost their subscribers linger a while."""

from __future__ import annotations

import itertools

import pytest

from odin_fanout.core.interest import Lingering
from odin_fanout.protocol.channels import covered_by, covers, covers_all, filters_for

SYMBOLS = ["BTC", "ETH", "SOL"]
EVENTS = ["trade", "liquidity"]
CHANNELS = [f"{s}.{e}" for s in SYMBOLS for e in EVENTS]
KEYS = [*CHANNELS, *(f"{s}.*" for s in SYMBOLS), *(f"*.{e}" for e in EVENTS), "*.*"]


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_filters_deliver_exactly_the_channels_some_key_receives(size: int) -> None:
    for keys in itertools.combinations(KEYS, size):
        filters = filters_for(keys, max_filters=100)
        for channel in CHANNELS:
            assert covers(filters, channel) == covered_by(channel, keys), (keys, channel)
        assert covers_all(filters, keys)


def test_a_name_under_a_pattern_is_not_a_filter_of_its_own() -> None:
    assert filters_for(["BTC.trade", "BTC.*", "ETH.trade", "*.trade"], 100) == frozenset(
        {"BTC.*", "*.trade"}
    )


def test_everything_when_asked_for_it_or_past_the_bound() -> None:
    assert filters_for(["BTC.trade", "*.*"], 100) is None
    assert filters_for(CHANNELS, max_filters=len(CHANNELS)) == frozenset(CHANNELS)
    assert filters_for(CHANNELS, max_filters=len(CHANNELS) - 1) is None
    assert covers(None, "ANY.trade") and covers_all(None, ["*.*"])


def test_nothing_wanted_is_no_filter_at_all() -> None:
    filters = filters_for([], 100)
    assert filters == frozenset()
    assert not covers(filters, "BTC.trade")
    assert covers_all(filters, [])


def test_covers_all_tells_what_is_missing() -> None:
    filters = filters_for(["BTC.*", "ETH.trade"], 100)
    assert covers_all(filters, ["BTC.trade", "BTC.*", "ETH.trade"])
    assert not covers_all(filters, ["ETH.liquidity"])
    assert not covers_all(filters, ["*.trade"])  # SOL.trade is not delivered
    assert not covers_all(filters, ["*.*"])


def test_keys_linger_after_their_last_subscriber_then_go() -> None:
    lingering = Lingering(linger=10.0)
    assert lingering.wanted(["BTC.trade", "ETH.trade"], now=0.0) == {"BTC.trade", "ETH.trade"}
    assert lingering.next_expiry() is None
    assert lingering.wanted(["ETH.trade"], now=1.0) == {"BTC.trade", "ETH.trade"}
    assert lingering.next_expiry() == 11.0
    assert lingering.wanted([], now=5.0) == {"BTC.trade", "ETH.trade"}
    assert lingering.next_expiry() == 11.0  # the oldest first
    assert lingering.wanted([], now=11.0) == {"ETH.trade"}
    assert lingering.next_expiry() == 15.0
    # Subscribed again before it expired: wanted, and no longer lingering.
    assert lingering.wanted(["ETH.trade"], now=12.0) == {"ETH.trade"}
    assert lingering.next_expiry() is None
    assert lingering.wanted([], now=13.0) == {"ETH.trade"}
    assert lingering.wanted([], now=23.0) == frozenset()


def test_no_linger_lets_keys_go_at_once() -> None:
    lingering = Lingering(linger=0.0)
    lingering.wanted(["BTC.trade"], now=0.0)
    assert lingering.wanted([], now=0.0) == frozenset()

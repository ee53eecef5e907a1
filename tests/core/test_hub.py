"""The subscription index: add, remove, match and its counters."""

from __future__ import annotations

from odin_fanout.core.hub import Hub


def test_empty_hub():
    hub: Hub[str] = Hub()
    assert hub.match("BTC.trade") == ()
    assert hub.count_matching("BTC.trade") == 0
    assert hub.keys == 0
    assert hub.subscriptions == 0
    assert hub.subscribers_of("BTC.trade") == 0


def test_add_is_idempotent():
    hub: Hub[str] = Hub()
    hub.add("BTC.trade", "a")
    hub.add("BTC.trade", "a")
    assert hub.subscriptions == 1
    assert hub.keys == 1
    assert hub.subscribers_of("BTC.trade") == 1
    assert hub.match("BTC.trade") == ("a",)


def test_remove_is_idempotent_and_drops_empty_keys():
    hub: Hub[str] = Hub()
    hub.add("BTC.trade", "a")
    hub.add("BTC.trade", "b")
    hub.add("BTC.*", "a")
    assert (hub.keys, hub.subscriptions) == (2, 3)
    hub.remove("BTC.trade", "a")
    hub.remove("BTC.trade", "a")
    assert (hub.keys, hub.subscriptions) == (2, 2)
    hub.remove("BTC.trade", "b")
    assert (hub.keys, hub.subscriptions) == (1, 1)
    assert hub.subscribers_of("BTC.trade") == 0
    hub.remove("BTC.*", "a")
    assert (hub.keys, hub.subscriptions) == (0, 0)
    assert hub.match("BTC.trade") == ()


def test_removing_unknown_keys_or_subscribers_changes_nothing():
    hub: Hub[str] = Hub()
    hub.add("BTC.trade", "a")
    hub.remove("ETH.trade", "a")
    hub.remove("BTC.trade", "zzz")
    assert (hub.keys, hub.subscriptions) == (1, 1)
    assert hub.match("BTC.trade") == ("a",)


def test_remove_all():
    hub: Hub[str] = Hub()
    for key in ("BTC.trade", "BTC.*", "*.*"):
        hub.add(key, "a")
        hub.add(key, "b")
    hub.remove_all(["BTC.trade", "BTC.*", "*.*", "never.added"], "a")
    assert hub.subscriptions == 3
    assert hub.keys == 3
    assert hub.match("BTC.trade") == ("b",)
    hub.remove_all(iter(["BTC.trade", "BTC.*", "*.*"]), "b")
    assert (hub.keys, hub.subscriptions) == (0, 0)


def test_match_finds_subscribers_of_every_key_once():
    hub: Hub[str] = Hub()
    for key in ("BTC.trade", "BTC.*", "*.trade", "*.*"):
        hub.add(key, "everywhere")
    hub.add("BTC.trade", "exact")
    hub.add("BTC.*", "symbol")
    hub.add("*.trade", "event")
    hub.add("*.*", "all")
    hub.add("ETH.trade", "other-symbol")
    hub.add("BTC.liquidity", "other-event")
    hub.add("ETH.*", "other-pattern")
    matched = hub.match("BTC.trade")
    assert len(matched) == len(set(matched)) == 5
    assert set(matched) == {"everywhere", "exact", "symbol", "event", "all"}
    assert hub.count_matching("BTC.trade") == 5
    assert set(hub.match("ETH.trade")) == {
        "everywhere",
        "event",
        "all",
        "other-symbol",
        "other-pattern",
    }
    assert set(hub.match("SOL.social")) == {"everywhere", "all"}


def test_match_through_a_single_key():
    hub: Hub[int] = Hub()
    hub.add("*.trade", 1)
    hub.add("*.trade", 2)
    assert sorted(hub.match("BTC.trade")) == [1, 2]
    assert hub.match("BTC.social") == ()


def test_match_returns_a_snapshot():
    hub: Hub[str] = Hub()
    subscribers = [f"s{i}" for i in range(20)]
    for name in subscribers:
        hub.add("BTC.trade", name)
    for name in subscribers[:10]:
        hub.add("*.*", name)
    delivered = []
    matched = hub.match("BTC.trade")
    # Delivery may evict slow subscribers (and others may join) while iterating.
    for name in matched:
        delivered.append(name)
        hub.remove_all(["BTC.trade", "*.*"], name)
        hub.add("BTC.trade", name + "-new")
    assert sorted(delivered) == sorted(subscribers)
    assert hub.subscriptions == 20
    assert set(hub.match("BTC.trade")) == {name + "-new" for name in subscribers}


def test_match_from_a_single_key_is_also_a_snapshot():
    hub: Hub[str] = Hub()
    hub.add("BTC.trade", "a")
    hub.add("BTC.trade", "b")
    matched = hub.match("BTC.trade")
    for name in matched:
        hub.remove("BTC.trade", name)
        hub.add("BTC.trade", name + "2")
    assert sorted(matched) == ["a", "b"]
    assert sorted(hub.match("BTC.trade")) == ["a2", "b2"]

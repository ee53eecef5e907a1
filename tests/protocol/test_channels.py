"""Channel names, patterns, match keys and the NATS subject mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.protocol.channels import (
    EVENT_TYPES,
    ChannelError,
    ChannelRules,
    channel_from_subject,
    covered_by,
    is_pattern,
    match_keys,
    matches,
    subject_for,
)

RULES = ChannelRules()


# ---- check ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "BTC.trade",
        "BTC.*",
        "*.trade",
        "*.*",
        "ETH-USD.liquidity",
        "SOL_2.balances",
        "0X.metadata",
        "A" * 32 + ".social",
    ],
)
def test_check_accepts_channels_and_patterns(name):
    assert RULES.check(name) == name


@pytest.mark.parametrize("event", EVENT_TYPES)
def test_check_accepts_every_known_event_family(event):
    assert RULES.check(f"BTC.{event}", allow_pattern=False) == f"BTC.{event}"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("btc.trade", "upper-case"),
        ("Btc.trade", "upper-case"),
        (".trade", "upper-case"),
        ("A" * 33 + ".trade", "1-32"),
        ("B*.trade", "upper-case"),
        ("BTC.Trade", "lower case"),
        ("BTC.", "lower case"),
        ("BTC.tr*", "lower case"),
        ("BTC.price", "unknown event 'price'"),
        ("BTCtrade", "is not SYMBOL.event"),
        ("", "is not SYMBOL.event"),
        ("BTC.trade.x", "is not SYMBOL.event"),
        ("BTC.*.*", "is not SYMBOL.event"),
    ],
)
def test_check_refuses_malformed_names_and_says_why(name, why):
    with pytest.raises(ChannelError) as info:
        RULES.check(name)
    assert why in str(info.value)
    assert repr(name) in str(info.value)


def test_unknown_event_message_lists_the_known_events():
    with pytest.raises(ChannelError) as info:
        RULES.check("BTC.price")
    for event in EVENT_TYPES:
        assert event in str(info.value)


@pytest.mark.parametrize("name", ["BTC.*", "*.trade", "*.*"])
def test_check_refuses_patterns_where_a_concrete_channel_is_needed(name):
    assert RULES.check(name, allow_pattern=True) == name
    with pytest.raises(ChannelError, match="is a pattern"):
        RULES.check(name, allow_pattern=False)


def test_custom_event_types_restrict_events():
    rules = ChannelRules(event_types=frozenset({"price"}))
    assert rules.check("BTC.price") == "BTC.price"
    with pytest.raises(ChannelError, match="unknown event 'trade'"):
        rules.check("BTC.trade")


def test_empty_event_types_accept_any_well_formed_event():
    rules = ChannelRules(event_types=frozenset())
    assert rules.check("BTC.anything_9") == "BTC.anything_9"
    with pytest.raises(ChannelError, match="lower case"):
        rules.check("BTC.Anything")


def test_is_pattern():
    assert is_pattern("BTC.*")
    assert is_pattern("*.trade")
    assert is_pattern("*.*")
    assert not is_pattern("BTC.trade")


# ---- matching -------------------------------------------------------------------------------


def test_match_keys_are_the_channel_and_its_three_patterns():
    assert match_keys("BTC.trade") == ("BTC.trade", "BTC.*", "*.trade", "*.*")


@pytest.mark.parametrize("pattern", ["BTC.trade", "BTC.*", "*.trade", "*.*"])
def test_matches_every_key_of_the_channel(pattern):
    assert matches(pattern, "BTC.trade")


@pytest.mark.parametrize("pattern", ["ETH.trade", "ETH.*", "*.liquidity", "BTC.liquidity", "BTC"])
def test_matches_refuses_other_channels(pattern):
    assert not matches(pattern, "BTC.trade")


def test_covered_by():
    assert covered_by("BTC.trade", ["ETH.*", "*.trade"])
    assert covered_by("BTC.trade", {"*.*"})
    assert covered_by("BTC.trade", iter(["BTC.trade"]))
    assert not covered_by("BTC.trade", ["ETH.*", "*.liquidity", "BTC.social"])
    assert not covered_by("BTC.trade", [])


# ---- subjects -------------------------------------------------------------------------------


def test_subject_for_and_back():
    assert subject_for("BTC.trade") == "odin.token.BTC.trade"
    assert channel_from_subject("odin.token.BTC.trade") == "BTC.trade"


@pytest.mark.parametrize(
    "subject",
    [
        "odin.token.BTC",
        "odin.token.BTC.trade.x",
        "other.prefix.BTC.trade",
        "odin.token.",
        "odin.token..trade",
        "odin.token.BTC.",
        "odin.tokenBTC.trade",
        "BTC.trade",
    ],
)
def test_channel_from_subject_refuses_other_shapes(subject):
    assert channel_from_subject(subject) is None


def test_custom_prefix():
    assert subject_for("BTC.trade", prefix="x.") == "x.BTC.trade"
    assert channel_from_subject("x.BTC.trade", prefix="x.") == "BTC.trade"
    assert channel_from_subject("odin.token.BTC.trade", prefix="x.") is None


symbols = st.from_regex(r"[A-Z0-9][A-Z0-9_-]{0,31}", fullmatch=True)
channels = st.builds(lambda s, e: f"{s}.{e}", symbols, st.sampled_from(EVENT_TYPES))


@settings(max_examples=50)
@given(channels)
def test_valid_channels_round_trip_through_subjects(channel):
    assert RULES.check(channel, allow_pattern=False) == channel
    assert channel_from_subject(subject_for(channel)) == channel

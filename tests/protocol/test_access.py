"""Who may subscribe to what: namespaces, their policies, and what a token grants."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.protocol.access import (
    ANONYMOUS,
    EVERYTHING_PUBLIC,
    POLICIES,
    AccessRules,
    Grant,
    Namespace,
    Policy,
    Refusal,
    covers,
    intersect,
    rules_from,
)


def rules(*items: str) -> AccessRules:
    """Rules from ``PATTERN=POLICY`` items, as an operator writes them in ``auth.namespaces``."""
    return rules_from(items)


def rules_of(namespaces: list[tuple[str, Policy]]) -> AccessRules:
    return rules_from([f"{pattern}={policy}" for pattern, policy in namespaces])


def allowed(access: AccessRules, key: str, grant: Grant = ANONYMOUS) -> bool:
    return access.check(key, grant) is None


# ---- defaults -------------------------------------------------------------------------------


def test_unconfigured_rules_are_open_and_allow_everything() -> None:
    access = AccessRules()
    assert access.open
    for key in ("BTC.trade", "BTC.*", "*.trade", "*.*", "PRIV.balances"):
        assert access.check(key, ANONYMOUS) is None
    assert access.check_all(["*.*", "BTC.trade"], ANONYMOUS) == []


def test_rules_with_only_public_namespaces_are_open() -> None:
    access = rules("BTC.*=public", "*.*=public")
    assert access.open
    assert allowed(access, "*.*")


def test_a_deny_or_token_namespace_makes_rules_not_open() -> None:
    assert not rules("BTC.*=public", "*.*=deny").open
    assert not rules("PRIV.*=token").open


def test_an_anonymous_grant_is_not_authenticated_and_a_token_one_is() -> None:
    assert not ANONYMOUS.authenticated
    assert Grant(subject="alice").authenticated
    assert Grant(channels=("PRIV.*",)).authenticated
    assert Grant(expires_at=1.0).authenticated


# ---- first matching namespace governs -------------------------------------------------------


def test_the_first_matching_namespace_governs_a_channel() -> None:
    access = rules("BTC.*=public", "*.*=deny")
    assert allowed(access, "BTC.trade")
    assert allowed(access, "BTC.liquidity")
    assert access.check("ETH.trade", ANONYMOUS) == Refusal("ETH.trade", "*.*", "deny")


def test_a_pattern_wholly_governed_by_an_earlier_public_namespace_is_allowed() -> None:
    access = rules("BTC.*=public", "*.*=deny")
    assert allowed(access, "BTC.*")


def test_a_pattern_that_could_receive_a_denied_channel_is_refused_whole() -> None:
    access = rules("BTC.*=public", "*.*=deny")
    assert access.check("*.*", ANONYMOUS) == Refusal("*.*", "*.*", "deny")
    # *.trade would receive ETH.trade, which *.* denies.
    assert access.check("*.trade", ANONYMOUS) == Refusal("*.trade", "*.*", "deny")


def test_a_denied_event_family_refuses_the_catch_all_pattern() -> None:
    access = rules("*.balances=deny")
    assert access.check("*.*", ANONYMOUS) == Refusal("*.*", "*.balances", "deny")
    assert access.check("BTC.*", ANONYMOUS) == Refusal("BTC.*", "*.balances", "deny")
    assert access.check("BTC.balances", ANONYMOUS) == Refusal("BTC.balances", "*.balances", "deny")
    assert allowed(access, "BTC.trade")
    assert allowed(access, "*.trade")


def test_check_all_lists_every_refusal_in_order() -> None:
    access = rules("BTC.*=public", "*.*=deny")
    refusals = access.check_all(["BTC.trade", "ETH.trade", "*.*"], ANONYMOUS)
    assert refusals == [Refusal("ETH.trade", "*.*", "deny"), Refusal("*.*", "*.*", "deny")]


# ---- token namespaces -----------------------------------------------------------------------


def test_a_token_namespace_refuses_a_connection_without_a_token() -> None:
    access = rules("PRIV.*=token")
    assert access.check("PRIV.trade", ANONYMOUS) == Refusal("PRIV.trade", "PRIV.*", "token")
    assert access.check("PRIV.*", ANONYMOUS) == Refusal("PRIV.*", "PRIV.*", "token")


def test_a_token_namespace_refuses_a_token_that_grants_other_channels() -> None:
    access = rules("PRIV.*=token")
    grant = Grant(subject="alice", channels=("BTC.*", "PRIV.liquidity"))
    assert access.check("PRIV.trade", grant) == Refusal("PRIV.trade", "PRIV.*", "token")


def test_a_token_granting_the_whole_namespace_allows_its_channels_and_patterns() -> None:
    access = rules("PRIV.*=token")
    grant = Grant(subject="alice", channels=("PRIV.*",))
    for key in ("PRIV.trade", "PRIV.liquidity", "PRIV.*", "*.trade"):
        assert allowed(access, key, grant), key


def test_a_token_granting_one_channel_allows_only_patterns_it_covers() -> None:
    access = rules("PRIV.*=token")
    grant = Grant(subject="alice", channels=("PRIV.trade",))
    assert allowed(access, "PRIV.trade", grant)
    # PRIV.* could receive PRIV.liquidity, which the token does not grant.
    assert access.check("PRIV.*", grant) == Refusal("PRIV.*", "PRIV.*", "token")
    assert access.check("PRIV.liquidity", grant) == Refusal("PRIV.liquidity", "PRIV.*", "token")
    # *.trade receives only PRIV.trade of the namespace, which the token grants.
    assert allowed(access, "*.trade", grant)
    # *.* would receive PRIV.liquidity.
    assert access.check("*.*", grant) == Refusal("*.*", "PRIV.*", "token")


def test_public_channels_need_no_token_beside_a_token_namespace() -> None:
    access = rules("PRIV.*=token")
    for key in ("BTC.trade", "BTC.*", "ETH.liquidity"):
        assert allowed(access, key)
        assert allowed(access, key, Grant(subject="alice", channels=("PRIV.trade",)))


def test_a_token_cannot_open_a_denied_namespace() -> None:
    access = rules("SECRET.*=deny", "*.*=token")
    grant = Grant(subject="root", channels=("*.*",))
    assert access.check("SECRET.trade", grant) == Refusal("SECRET.trade", "SECRET.*", "deny")
    assert allowed(access, "BTC.trade", grant)
    assert access.check("*.*", grant) == Refusal("*.*", "SECRET.*", "deny")


# ---- refusal messages -----------------------------------------------------------------------


def test_a_deny_refusal_message_names_the_key_and_the_namespace() -> None:
    message = Refusal("ETH.trade", "*.*", "deny").message()
    assert "'ETH.trade'" in message
    assert "'*.*'" in message
    assert "not served" in message


def test_a_token_refusal_message_names_the_key_and_says_a_token_is_needed() -> None:
    message = Refusal("PRIV.trade", "PRIV.*", "token").message()
    assert "'PRIV.trade'" in message
    assert "'PRIV.*'" in message
    assert "token" in message


# ---- intersect, covers, rules_from ----------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        ("BTC.*", "*.trade", "BTC.trade"),
        ("*.trade", "BTC.*", "BTC.trade"),
        ("*.*", "BTC.trade", "BTC.trade"),
        ("*.*", "*.*", "*.*"),
        ("BTC.*", "BTC.*", "BTC.*"),
        ("BTC.trade", "BTC.trade", "BTC.trade"),
        ("BTC.*", "ETH.*", None),
        ("BTC.trade", "BTC.liquidity", None),
        ("*.trade", "*.liquidity", None),
        ("BTC.trade", "ETH.*", None),
    ],
)
def test_intersect_gives_the_channels_both_patterns_receive(
    a: str, b: str, shared: str | None
) -> None:
    assert intersect(a, b) == shared


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("*.*", "BTC.trade", True),
        ("*.*", "*.*", True),
        ("BTC.*", "BTC.trade", True),
        ("*.trade", "BTC.trade", True),
        ("BTC.trade", "BTC.trade", True),
        ("BTC.trade", "BTC.*", False),
        ("BTC.*", "*.trade", False),
        ("BTC.*", "*.*", False),
        ("BTC.*", "ETH.trade", False),
        ("*.trade", "BTC.liquidity", False),
    ],
)
def test_covers_says_whether_every_channel_of_one_pattern_is_in_the_other(
    outer: str, inner: str, expected: bool
) -> None:
    assert covers(outer, inner) is expected


def test_rules_from_keeps_the_configured_order_and_policies() -> None:
    access = rules_from(["BTC.*=public", " PRIV.* = token ", "*.*=deny"])
    assert access.namespaces == (
        Namespace("BTC.*", "public"),
        Namespace("PRIV.*", "token"),
        Namespace("*.*", "deny"),
    )
    assert rules_from([]) == AccessRules()
    assert rules_from([]) == EVERYTHING_PUBLIC


@pytest.mark.parametrize("item", ["BTC.*=private", "BTC.*", "BTC.*="])
def test_rules_from_refuses_a_policy_that_is_none_of_ours(item: str) -> None:
    with pytest.raises(ValueError, match="policy"):
        rules_from([item])


# ---- properties over a small alphabet -------------------------------------------------------

SYMBOLS = ("A", "B")
EVENTS = ("trade", "liquidity")
CHANNELS = tuple(f"{s}.{e}" for s, e in itertools.product(SYMBOLS, EVENTS))
PATTERNS = tuple(f"{s}.{e}" for s, e in itertools.product((*SYMBOLS, "*"), (*EVENTS, "*")))


def receives(pattern: str, channel: str) -> bool:
    """Independent of the module: a pattern receives a channel segment by segment."""
    return all(p in ("*", c) for p, c in zip(pattern.split("."), channel.split("."), strict=True))


def expected_refusal(
    namespaces: list[tuple[str, Policy]], grants: tuple[str, ...], channel: str
) -> Refusal | None:
    """The reference: the first namespace receiving ``channel`` decides (public if none)."""
    for pattern, policy in namespaces:
        if not receives(pattern, channel):
            continue
        if policy == "public":
            return None
        if policy == "token" and any(receives(g, channel) for g in grants):
            return None
        return Refusal(channel, pattern, policy)
    return None


namespaces_st = st.lists(
    st.tuples(st.sampled_from(PATTERNS), st.sampled_from(POLICIES)), max_size=5
)
grants_st = st.lists(st.sampled_from(PATTERNS), max_size=3).map(tuple)


@settings(max_examples=400)
@given(namespaces=namespaces_st, grants=grants_st)
def test_a_channel_gets_the_policy_of_the_first_namespace_matching_it(
    namespaces: list[tuple[str, Policy]], grants: tuple[str, ...]
) -> None:
    access = rules_of(namespaces)
    grant = Grant(subject="s", channels=grants)
    for channel in CHANNELS:
        assert access.check(channel, grant) == expected_refusal(namespaces, grants, channel)


@settings(max_examples=400)
@given(namespaces=namespaces_st, grants=grants_st)
def test_an_allowed_pattern_never_receives_a_channel_that_is_refused(
    namespaces: list[tuple[str, Policy]], grants: tuple[str, ...]
) -> None:
    access = rules_of(namespaces)
    grant = Grant(subject="s", channels=grants)
    for pattern in PATTERNS:
        refusal = access.check(pattern, grant)
        if refusal is None:
            for channel in CHANNELS:
                if receives(pattern, channel):
                    assert expected_refusal(namespaces, grants, channel) is None, (
                        pattern,
                        channel,
                    )
        else:
            # A refusal names a configured, non-public namespace the pattern overlaps.
            assert refusal.key == pattern
            assert (refusal.namespace, refusal.policy) in namespaces
            assert refusal.policy != "public"
            assert intersect(pattern, refusal.namespace) is not None


@settings(max_examples=200)
@given(namespaces=namespaces_st, grants=grants_st, keys=st.lists(st.sampled_from(PATTERNS)))
def test_check_all_agrees_with_check(
    namespaces: list[tuple[str, Policy]], grants: tuple[str, ...], keys: list[str]
) -> None:
    access = rules_of(namespaces)
    grant = Grant(subject="s", channels=grants)
    one_by_one = [r for key in keys if (r := access.check(key, grant)) is not None]
    assert access.check_all(keys, grant) == one_by_one


@given(a=st.sampled_from(PATTERNS), b=st.sampled_from(PATTERNS))
def test_intersect_and_covers_agree_with_the_channels_received(a: str, b: str) -> None:
    shared = intersect(a, b)
    both = {c for c in CHANNELS if receives(a, c) and receives(b, c)}
    if shared is None:
        assert both == set()
    else:
        assert {c for c in CHANNELS if receives(shared, c)} == both
    assert intersect(b, a) == shared
    a_channels = {c for c in CHANNELS if receives(a, c)}
    b_channels = {c for c in CHANNELS if receives(b, c)}
    assert covers(a, b) == (b_channels <= a_channels)

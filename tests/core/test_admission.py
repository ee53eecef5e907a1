"""Client addresses behind proxies, and the per-address and per-subject counts (sans-IO)."""

from __future__ import annotations

import pytest

from odin_fanout.core.admission import (
    ADDRESS_TABLE,
    IP_RATE,
    PER_IP,
    Admission,
    Limits,
    TrustedProxies,
    forwarded_for,
    parse_address,
    parse_networks,
)

TRUSTED = TrustedProxies(parse_networks(["10.0.0.0/8", "127.0.0.1"]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4:5678 ", "1.2.3.4"),
        ("2001:db8::1", "2001:db8::1"),
        ('"[2001:db8::1]:4711"', "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("unknown", None),
        ("_hidden", None),
        ("[2001:db8::1", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed is not None else None) == expected


def test_forwarded_for_values() -> None:
    value = 'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711", by=x'
    assert forwarded_for(value) == ["192.0.2.60", '"[2001:db8:cafe::17]:4711"']


def test_bad_networks_are_named() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_networks(["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("peer", "hops", "client"),
    [
        ("192.0.2.1", ["203.0.113.9"], "192.0.2.1"),  # untrusted peer: its headers ignored
        ("10.0.0.5", [], "10.0.0.5"),  # a trusted proxy that names nobody is the client
        ("10.0.0.5", ["203.0.113.9"], "203.0.113.9"),
        ("10.0.0.5", ["6.6.6.6", "203.0.113.9"], "203.0.113.9"),  # the right-most untrusted
        ("10.0.0.5", ["203.0.113.9", "10.1.1.1"], "203.0.113.9"),  # through two proxies
        ("10.0.0.5", ["garbage", "10.1.1.1"], "10.1.1.1"),  # stops at what is not an address
        ("127.0.0.1", ["10.9.9.9"], "10.9.9.9"),  # all trusted: the farthest
    ],
)
def test_client_is_the_right_most_untrusted_hop(peer: str, hops: list[str], client: str) -> None:
    assert TRUSTED.client(peer, hops) == client


def test_per_address_count_and_release() -> None:
    admission = Admission(Limits(max_per_ip=2))
    assert admission.admit_address("a", 0) is None
    assert admission.admit_address("a", 0) is None
    assert admission.admit_address("a", 0) == PER_IP
    assert admission.admit_address("b", 0) is None
    admission.release_address("a", 1)
    assert admission.admit_address("a", 1) is None
    for _ in range(2):
        admission.release_address("a", 2)
    admission.release_address("b", 2)
    assert admission.addresses == 0  # no limits left to remember


def test_new_connection_bucket() -> None:
    admission = Admission(Limits(new_per_second=2, new_burst=2))
    assert admission.admit_address("a", 0) is None
    assert admission.admit_address("a", 0) is None
    assert admission.admit_address("a", 0) == IP_RATE
    assert admission.admit_address("a", 0.5) is None  # one token back after half a second
    for _ in range(3):
        admission.release_address("a", 0.5)
    assert admission.addresses == 1  # its bucket refills: remembered until it is full
    assert admission.admit_address("z", 1.5) is None  # a full refill later, "a" is forgotten
    assert admission.addresses == 1


def test_the_table_is_bounded() -> None:
    evicted: list[int] = []
    admission = Admission(
        Limits(new_per_second=1, new_burst=5, max_addresses=2), on_evict=lambda: evicted.append(1)
    )
    assert admission.admit_address("a", 0) is None
    assert admission.admit_address("b", 0) is None
    assert admission.admit_address("c", 0) == ADDRESS_TABLE  # both have open connections
    admission.release_address("a", 0)
    assert admission.admit_address("c", 0) is None  # "a" (idle) is forgotten early
    assert evicted == [1]
    assert admission.addresses == 2


def test_subjects() -> None:
    admission = Admission(Limits(max_per_subject=1))
    ticket = admission.ticket()
    assert ticket.admit_subject("alice")
    assert not admission.ticket().admit_subject("alice")
    assert admission.ticket().admit_subject("")  # no subject: not limited
    ticket.release(0)
    ticket.release(0)  # once only
    assert admission.open_for("alice") == 0
    assert admission.ticket().admit_subject("alice")

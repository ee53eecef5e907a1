"""Parsing of settings whose shape is more than a type: NATS server URLs."""

from __future__ import annotations

import pytest

from odin_fanout.config import NatsAddress, nats_addresses


def test_nats_urls_with_credentials_tokens_and_default_ports() -> None:
    urls = "nats://odin:p%40ss@nats-a:4223, nats://t0ken@nats-b ,127.0.0.1:4300"
    assert nats_addresses(urls) == [
        NatsAddress("nats://odin:p%40ss@nats-a:4223", "nats-a", 4223, "odin", "p@ss", ""),
        NatsAddress("nats://t0ken@nats-b", "nats-b", 4222, "", "", "t0ken"),
        NatsAddress("127.0.0.1:4300", "127.0.0.1", 4300, "", "", ""),
    ]
    assert [address.display for address in nats_addresses(urls)] == [
        "nats://nats-a:4223",
        "nats://nats-b:4222",
        "nats://127.0.0.1:4300",
    ]
    assert nats_addresses("") == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://nats:4222", "only nats:// and tls://"),
        ("ws://nats:4222", "only nats:// and tls://"),
        ("nats://nats:port", "the port is not a number"),
        ("nats://:4222", "expected nats://host:port"),
        ("nats://nats:4222/path", "expected nats://host:port"),
    ],
)
def test_bad_nats_urls_are_refused_with_the_reason(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        nats_addresses(url)


def test_tls_urls_are_accepted_and_shown_as_tls() -> None:
    (address,) = nats_addresses("tls://odin:secret@nats.example:4443")
    assert address.tls is True
    assert address.display == "tls://nats.example:4443"
    assert nats_addresses("nats://nats")[0].tls is False

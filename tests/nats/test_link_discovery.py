"""The pure parts of the links' cluster discovery (``link.py``): INFO read into URLs, the
seeds merged with what the cluster announced (credentials kept), lame-duck mode, and the
order servers are tried in."""

from __future__ import annotations

import random

from odin_fanout.broker.nats.link import (
    connect_order,
    connect_urls,
    discovered_addresses,
    is_lame_duck,
    merge_servers,
    parse_info,
    server_key,
)
from odin_fanout.config import NatsAddress, nats_addresses

INFO = (
    b'INFO {"server_id":"N1","server_name":"n1","version":"2.15.1","proto":1,'
    b'"host":"127.0.0.1","port":4222,"headers":true,"max_payload":1048576,'
    b'"connect_urls":["127.0.0.1:4222","127.0.0.1:4223","[::1]:4224"]}'
)


def test_an_info_is_read_into_its_client_urls() -> None:
    info = parse_info(INFO)
    assert info["server_name"] == "n1"
    assert connect_urls(info) == ["127.0.0.1:4222", "127.0.0.1:4223", "[::1]:4224"]
    assert not is_lame_duck(info)


def test_an_info_without_urls_announces_none() -> None:
    assert connect_urls(parse_info(b'INFO {"server_id":"N1"}')) is None
    assert connect_urls(parse_info(b'INFO {"connect_urls":[]}')) is None
    assert parse_info(b"INFO not json") == {}
    assert parse_info(b"PING") == {}
    assert parse_info(b"INFO [1]") == {}


def test_lame_duck_mode_is_read_from_ldm() -> None:
    assert is_lame_duck(parse_info(b'INFO {"ldm":true,"connect_urls":["a:1"]}'))
    assert not is_lame_duck(parse_info(b'INFO {"ldm":false}'))
    assert not is_lame_duck(parse_info(b'INFO {"ldm":"yes"}'))


def test_discovered_servers_take_the_announcing_servers_credentials() -> None:
    (announcer,) = nats_addresses("nats://odin:s%40cret@10.0.0.1:4222")
    found = discovered_addresses(["10.0.0.2:4222", "nats://10.0.0.3", "[fd00::4]:4300"], announcer)
    assert [(a.host, a.port) for a in found] == [
        ("10.0.0.2", 4222), ("10.0.0.3", 4222), ("fd00::4", 4300)
    ]  # fmt: skip
    assert {(a.user, a.password, a.token) for a in found} == {("odin", "s@cret", "")}
    assert "s@cret" not in found[0].url
    (token,) = nats_addresses("nats://t0ken@10.0.0.1")
    assert discovered_addresses(["10.0.0.2:4222"], token)[0].token == "t0ken"


def test_malformed_urls_are_skipped() -> None:
    (announcer,) = nats_addresses("nats://10.0.0.1")
    found = discovered_addresses(
        ["10.0.0.2:notaport", "tls://10.0.0.3:4222", ":4222", ""], announcer
    )
    assert found == []


def test_the_seeds_stay_first_with_their_own_credentials_and_nothing_twice() -> None:
    seeds = nats_addresses("nats://a:pa@10.0.0.1:4222,nats://b:pb@10.0.0.2:4222")
    announced = discovered_addresses(
        ["10.0.0.1:4222", "10.0.0.2:4222", "10.0.0.3:4222", "10.0.0.3:4222"], seeds[1]
    )
    pool = merge_servers(seeds, announced)
    assert pool[:2] == seeds  # a seed keeps its configured credentials
    assert [(a.host, a.user) for a in pool] == [
        ("10.0.0.1", "a"), ("10.0.0.2", "b"), ("10.0.0.3", "b")
    ]  # fmt: skip
    assert merge_servers(seeds, []) == seeds


def address(host: str) -> NatsAddress:
    return NatsAddress(f"nats://{host}:4222", host, 4222)


def test_servers_that_never_failed_come_first_shuffled_the_failed_last() -> None:
    servers = [address(f"10.0.0.{n}") for n in range(1, 6)]
    failed = {server_key(servers[0]): 20.0, server_key(servers[1]): 10.0}
    orders = {
        tuple(a.host for a in connect_order(servers, failed, random.Random(seed)))
        for seed in range(50)
    }
    for order in orders:
        # Never failed first, then the one that failed longest ago, the latest failure last.
        assert set(order[:3]) == {"10.0.0.3", "10.0.0.4", "10.0.0.5"}
        assert order[3:] == ("10.0.0.2", "10.0.0.1")
    assert len(orders) > 1  # shuffled: instances spread over the cluster


def test_the_order_holds_every_known_server_once() -> None:
    servers = [address(f"10.0.0.{n}") for n in range(1, 4)]
    assert sorted(connect_order(servers, {}), key=lambda a: a.host) == servers
    assert connect_order([], {}) == []

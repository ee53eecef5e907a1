"""The PROXY protocol parser: v1 and v2, incremental, bounded, and never surprised."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from odin_fanout.core.proxy_protocol import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
    v1_header,
    v2_header,
)


def feed(data: bytes) -> tuple[ProxyHeader, int]:
    """Parse ``data`` as a reader would: asking for no more than the parser says it needs,
    one byte at a time when it needs several; the header and the number of reads."""
    buffer = b""
    reads = 0
    while True:
        result = parse(buffer)
        if isinstance(result, ProxyHeader):
            return result, reads
        assert result >= 1
        assert len(buffer) + result <= len(data), "asked for bytes past the header"
        buffer += data[len(buffer) : len(buffer) + result]
        reads += 1


def test_v1_tcp4() -> None:
    data = b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 443\r\n"
    header = parse(data + b"GET / HTTP/1.1\r\n")
    assert header == ProxyHeader(len(data), "192.0.2.10", 56324, version=1)


def test_v1_tcp6() -> None:
    data = v1_header("2001:db8::1", "2001:db8::2", 4711, 443)
    assert parse(data) == ProxyHeader(len(data), "2001:db8::1", 4711, version=1)


def test_v1_unknown_keeps_the_peer() -> None:
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(15, None, None, version=1)
    data = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"
    assert parse(data) == ProxyHeader(len(data), version=1)


def test_v2_ipv4_and_ipv6() -> None:
    data = v2_header("192.0.2.10", "10.0.0.1", 56324, 443)
    assert parse(data + b"GET") == ProxyHeader(len(data), "192.0.2.10", 56324, version=2)
    data = v2_header("2001:db8::1", "2001:db8::2", 4711, 443)
    assert parse(data) == ProxyHeader(len(data), "2001:db8::1", 4711, version=2)


def test_v2_tlvs_are_skipped() -> None:
    tlv = b"\x04" + struct.pack("!H", 5) + b"vpce1"
    data = v2_header("192.0.2.10", "10.0.0.1", 1, 2, tlvs=tlv)
    assert parse(data + b"rest") == ProxyHeader(len(data), "192.0.2.10", 1, version=2)


def test_v2_local_command() -> None:
    data = v2_header()
    assert parse(data) == ProxyHeader(16, None, None, version=2)


def test_v2_unix_family_has_no_address() -> None:
    body = b"\x00" * 216
    data = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, len(body)) + body
    assert parse(data) == ProxyHeader(len(data), version=2)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 443\r\n",
        b"PROXY UNKNOWN\r\n",
        v2_header("192.0.2.10", "10.0.0.1", 56324, 443),
        v2_header("2001:db8::1", "2001:db8::2", 4711, 443),
        v2_header(),
    ],
)
def test_split_across_reads_never_reads_past_the_header(data: bytes) -> None:
    header, reads = feed(data)
    assert header.length == len(data)
    assert reads >= 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"PROXX TCP4", "no PROXY protocol header"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "not TCP4 addresses"),
        (b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n", "not TCP4 addresses"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4\n", "bad line ending"),
        (b"PROXY \xff\xfe\r\n", "not ASCII"),
        (b"PROXY TCP4 " + b"1" * V1_MAX, "longer than 107"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "unsupported version"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "unknown command"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "addresses truncated"),
        (V2_SIGNATURE + b"\x21\x51\x00\x00", "unknown address family"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "longer than"),
        (V2_SIGNATURE[:5] + b"X", "no PROXY protocol header"),
    ],
)
def test_garbage_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse(data)


def test_v1_without_crlf_in_107_bytes_is_too_long() -> None:
    data = b"PROXY UNKNOWN " + b"x" * 200
    with pytest.raises(ProxyHeaderError, match="longer than"):
        parse(data)
    # ...even when it arrives a little at a time: the parser never asks past the bound.
    with pytest.raises(ProxyHeaderError, match="longer than"):
        feed(data)


def test_v2_length_is_bounded() -> None:
    assert parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX - 16)) == V2_MAX - 16
    with pytest.raises(ProxyHeaderError):
        parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX - 15))


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_a_count_or_its_own_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)
    else:
        assert result >= 1


@given(
    st.sampled_from(
        [
            v1_header("192.0.2.10", "10.0.0.1", 56324, 443),
            v2_header("2001:db8::1", "2001:db8::2", 4711, 443),
        ]
    ),
    st.integers(0, 60),
    st.binary(max_size=8),
)
def test_mutated_headers_give_a_header_a_count_or_its_own_error(
    data: bytes, index: int, junk: bytes
) -> None:
    mutated = data[:index] + junk + data[index + len(junk) :]
    try:
        result = parse(mutated)
    except ProxyHeaderError:
        return
    assert isinstance(result, int | ProxyHeader)

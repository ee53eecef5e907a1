"""The PROXY protocol header (HAProxy's, v1 text and v2 binary), parsed sans-IO.

A proxy in front of Odin that speaks it (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB,
nginx ``proxy_protocol on``) writes one header first on every connection, naming the client's
address; the HTTP request follows. Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

Written here rather than taken from PyPI: the one library (``proxy-protocol``, last released
in 2024) is built around an asyncio server, not a parser a Trio server can drive, and the
format is small. ``parse`` is incremental: given the bytes read so far it returns the header,
or how many more bytes the header needs at least, so a reader that asks for no more than that
never reads past the header into the request (nothing needs to be handed back).
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
"""The longest v1 header, CRLF included (the spec's bound)."""
V1_MIN = len(b"PROXY UNKNOWN\r\n")
V2_MAX = 16 + 4096
"""The longest v2 header accepted: the 16 fixed bytes and up to 4 KiB of addresses and TLVs
(the spec allows 64 KiB; proxies send a few hundred bytes at most)."""
_V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX


class ProxyHeaderError(Exception):
    """Not a valid PROXY protocol header; the connection is closed."""


@attrs.frozen
class ProxyHeader:
    length: int
    """Bytes the header took, all of them consumed."""
    source: str | None = None
    """The client's address; None for a v2 LOCAL header, v1 UNKNOWN or a non-IP family (a
    proxy's own connection, a health check): the connection's own peer stands."""
    source_port: int | None = None
    version: int = 1


def parse(data: bytes) -> ProxyHeader | int:
    """The header at the start of ``data``, or the number of bytes it still needs at least
    (never more than belong to it); ProxyHeaderError if it cannot be one."""
    if not data:
        return V1_MIN
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | int:
    known = min(len(data), len(V1_PREFIX))
    if data[:known] != V1_PREFIX[:known]:
        raise ProxyHeaderError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        if b"\n" in data or b"\x00" in data:
            raise ProxyHeaderError("v1 header: bad line ending")
        # The CRLF is still to come: one byte if the last one read is its CR.
        return max(V1_MIN - len(data), 1 if data.endswith(b"\r") else 2)
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header: not ASCII") from None
    fields = text.split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return ProxyHeader(end + 2, version=1)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 header: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    _, family, source, destination, source_port, destination_port = fields
    kind = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    try:
        address = kind(source)
        kind(destination)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: not {family} addresses") from None
    ports = []
    for port in (source_port, destination_port):
        if not port.isdigit() or len(port) > 5 or (len(port) > 1 and port[0] == "0"):
            raise ProxyHeaderError("v1 header: bad port")
        ports.append(int(port))
    if max(ports) > 65535:
        raise ProxyHeaderError("v1 header: bad port")
    return ProxyHeader(end + 2, str(address), ports[0], version=1)


def _parse_v2(data: bytes) -> ProxyHeader | int:
    known = min(len(data), len(V2_SIGNATURE))
    if data[:known] != V2_SIGNATURE[:known]:
        raise ProxyHeaderError("no PROXY protocol header")
    if len(data) < 16:
        return 16 - len(data)
    version_command, family_protocol, length = data[12], data[13], (data[14] << 8) | data[15]
    if version_command >> 4 != 2:
        raise ProxyHeaderError("v2 header: unsupported version")
    command = version_command & 0xF
    if command > 1:
        raise ProxyHeaderError("v2 header: unknown command")
    total = 16 + length
    if total > V2_MAX:
        raise ProxyHeaderError(f"v2 header longer than {V2_MAX} bytes")
    if len(data) < total:
        return total - len(data)
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family > 3 or protocol > 2:
        raise ProxyHeaderError("v2 header: unknown address family or protocol")
    needed = _V2_ADDRESS_SIZES.get(family, 0)
    if length < needed:
        raise ProxyHeaderError("v2 header: addresses truncated")
    if command == 0 or family not in (0x1, 0x2):
        # LOCAL (the proxy's own connection, a health check), UNSPEC or a Unix socket.
        return ProxyHeader(total, version=2)
    if family == 0x1:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(data[16:20])
        port = (data[24] << 8) | data[25]
    else:
        address = ipaddress.IPv6Address(data[16:32])
        port = (data[48] << 8) | data[49]
    return ProxyHeader(total, str(address), port, version=2)


def v1_header(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    """A v1 header (for tests and tools)."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def v2_header(
    source: str | None = None,
    destination: str | None = None,
    source_port: int = 0,
    destination_port: int = 0,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header: PROXY over TCP with these addresses, or LOCAL without them."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body

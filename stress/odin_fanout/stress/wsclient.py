"""The client side of RFC 6455 in a few functions, for load clients on raw asyncio.

Why by hand: a load client must spend less CPU per message than the server it measures, and
a WebSocket library's client (websockets, wsproto) costs several times what these few
functions do per frame. Only what a subscriber needs: the upgrade request and its check
(no extensions, so no compression), masked client frames, and a reader that splits the
server's unmasked frames and says which ones break the rules.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KNOWN_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
MAX_HEAD = 16384


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A complete masked client frame (RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big") if length else 0
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big") if length else b""
    return header + mask + masked


def upgrade_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The HTTP/1.1 upgrade request and the ``Sec-WebSocket-Accept`` it must get back."""
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        # Odin's protocol v1: gap notices and reconnect hints, which the checks count.
        "Sec-WebSocket-Protocol: odin.v1\r\n\r\n"
    ).encode()
    return request, base64.b64encode(hashlib.sha1(key + GUID).digest())


def read_upgrade(head: bytes, data: bytes, accept: bytes) -> tuple[bytes, bytes | None, str]:
    """Take ``data`` into the upgrade response read so far (``head``): (the head kept, the
    bytes after it once it is complete (None before), why it is not a good upgrade or "")."""
    head += data
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return head, None, "handshake: response head too large" if len(head) > MAX_HEAD else ""
    return b"", head[end + 4 :], check_upgrade(head[:end], accept) or ""


def check_upgrade(head: bytes, accept: bytes) -> str | None:
    """Why the response head (without its blank line) is not a good upgrade, or None."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101"):
        return f"handshake: {lines[0][:60].decode(errors='replace')}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept:
        return "handshake: bad Sec-WebSocket-Accept"
    if b"sec-websocket-extensions" in headers:
        return "handshake: server negotiated an extension"
    return None


class FrameReader:
    """Splits the server's byte stream into frames. ``feed`` yields ``(opcode, payload)`` for
    each complete frame, or ``(-1, reason)`` for one that breaks the rules (masked, reserved
    bits, unknown opcode, fragmented: no server under test fragments small messages)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        size = len(data)
        pos = 0
        while pos + 2 <= size:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if pos + 4 > size:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if pos + 10 > size:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                header = 10
            masked = b1 & 0x80
            if masked:
                header += 4
            end = pos + header + length
            if end > size:
                break
            opcode = b0 & 0x0F
            payload = data[pos + header : end]
            pos = end
            if masked:
                yield -1, b"masked server frame"
            elif b0 & 0x70 or opcode not in KNOWN_OPCODES:
                yield -1, b"reserved bits or opcode"
            elif not b0 & 0x80 or opcode == OP_CONT:
                yield -1, b"fragmented"
            else:
                yield opcode, payload
        if pos < size:
            self._buffer = data[pos:]

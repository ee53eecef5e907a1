"""The WebSocket opening handshake (RFC 6455 §4.2), from the request head already parsed.

The server parses each request head once, with h11 (http.py), to route it; this module checks
that head for a valid upgrade and writes the 101 response, then the connection drives
wsproto's frame-level ``Connection`` directly. (wsproto's ``WSConnection`` would parse the head
a second time with its own h11 connection, the cost that showed in the accept profile.)

``MessageSizeGuard`` refuses an inbound message on the frame header that takes it over the
limit, before its payload arrives: it is a wsproto extension that is never negotiated (no
``Sec-WebSocket-Extensions``), only installed on our side, because the extension hook is
wsproto's public way to see each frame's announced length.
"""

from __future__ import annotations

import base64
import binascii

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.utilities import generate_accept_token

from odin_fanout.server.http import RequestHead, response

_DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION)
_NO_RSV = RsvBits(False, False, False)


class HandshakeRefused(Exception):
    def __init__(self, answer: bytes) -> None:
        super().__init__("handshake refused")
        self.answer = answer


def accept(head: RequestHead, subprotocol: str | None) -> bytes:
    """The 101 response accepting ``head``'s upgrade, or HandshakeRefused with the 4xx."""
    headers = head.headers
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise HandshakeRefused(response(400, b"missing Connection: upgrade\n"))
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeRefused(
            response(
                426,
                b"unsupported WebSocket version; this server speaks 13\n",
                headers=[(b"Sec-WebSocket-Version", b"13")],
            )
        )
    key = headers.get("sec-websocket-key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid_key = False
    if not valid_key:
        raise HandshakeRefused(response(400, b"missing or malformed Sec-WebSocket-Key\n"))
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(key.encode()),
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


class MessageSizeGuard(Extension):
    """Close with 1009 as soon as a frame header announces more than ``limit`` bytes for the
    message it belongs to (its earlier fragments included)."""

    name = "odin-message-size-guard"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._size = 0

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # never offered to a peer: it only guards our side

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,  # noqa: ARG002 (wsproto's signature)
        opcode: Opcode,
        rsv: RsvBits,  # noqa: ARG002
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode in _DATA_OPCODES:
            if opcode is not Opcode.CONTINUATION:
                self._size = 0
            self._size += payload_length
            if self._size > self.limit:
                return CloseReason.MESSAGE_TOO_BIG
        return _NO_RSV

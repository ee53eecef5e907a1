"""Server-Sent Events: Odin's messages as ``text/event-stream`` blocks, and the stream's cursor.

An SSE stream carries the same JSON documents as a WebSocket connection. Events (envelopes)
are unnamed, so a browser's ``EventSource.onmessage`` gets them; everything else is named
after its protocol ``type`` (``subscription_ack``, ``gap``, ``reconnect``, ...).

The ``id:`` of an event is the stream's **cursor**, ``<epoch>:<position>``: every message of
the stream's channels at or before that position has been sent (or announced by a ``gap``).
Positions are shared by every channel of a history, so one number covers the whole stream,
however many channels and patterns it has; a browser sends it back as ``Last-Event-ID`` when
it reconnects, and the server sends exactly what came after it (docs/clients.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from odin_fanout.protocol.codec import encode_gap
from odin_fanout.protocol.messages import ServerMessage

_CURSOR = re.compile(r"([0-9A-Za-z_-]{1,64}):([0-9]{1,19})")


@attrs.frozen
class Cursor:
    """Where a stream stopped: everything up to ``seq`` of history ``epoch`` was sent."""

    epoch: str
    seq: int

    def encode(self) -> bytes:
        return f"{self.epoch}:{self.seq}".encode()


class BadCursor(ValueError):
    """A ``Last-Event-ID`` that is not a cursor this server issued."""


def parse_cursor(text: str) -> Cursor | None:
    """The cursor in a ``Last-Event-ID`` header (or ``last_event_id`` parameter); None for
    an empty one (a stream that never got an id)."""
    text = text.strip()
    if not text:
        return None
    match = _CURSOR.fullmatch(text)
    if match is None:
        raise BadCursor(f"{text[:80]!r} is not an Odin position ('<epoch>:<seq>')")
    return Cursor(match[1], int(match[2]))


def parse_channels(values: Iterable[str]) -> list[str]:
    """``channels=BTC.trade,ETH.*`` (the parameter may repeat): the names, in order, empty
    items dropped. Validation is the session's, as for a subscribe."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def block(data: bytes, *, event: bytes = b"", cursor: bytes = b"") -> bytes:
    """One event-stream block for a JSON document.

    Odin's own JSON (orjson) has no line breaks, but an envelope carries the publisher's JSON
    byte for byte, which may: each line becomes a ``data:`` line of its own, which the
    browser joins with ``\\n`` (JSON whitespace, so the document parses the same).
    """
    if b"\n" in data or b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
    head = b""
    if event:
        head += b"event: " + event + b"\n"
    if cursor:
        head += b"id: " + cursor + b"\n"
    return head + b"data: " + data + b"\n\n"


def cursor_only(cursor: Cursor) -> bytes:
    """A block that moves the browser's last event id without an event (no ``data``: the
    spec sets the id and dispatches nothing)."""
    return b"id: " + cursor.encode() + b"\n\n"


def message_block(message: ServerMessage, encoded: bytes) -> bytes:
    """A control message (ack, error, reconnect, ...), named after its type."""
    return block(encoded, event=message.TYPE.encode())


def gap_block(channel: str, first: int, last: int, reason: str) -> bytes:
    return block(encode_gap(channel, first, last, reason), event=b"gap")


def retry_block(milliseconds: int) -> bytes:
    """Tell the browser how long to wait before it reconnects."""
    return f"retry: {max(0, milliseconds)}\n\n".encode()


COMMENT = b":\n\n"
"""A keep-alive: proxies see traffic, and a dead peer is found when the write fails."""


def frame_payload(frame: bytes) -> bytes:
    """The payload of one of Odin's pre-encoded WebSocket text frames (``codec.text_frame``:
    unmasked, one frame), so an event encoded once for WebSocket is reused, not re-encoded."""
    length = frame[1] & 0x7F
    offset = 2 if length < 126 else (4 if length == 126 else 10)
    return frame[offset:]

"""The NATS client protocol as a client reads it: bytes in, operations out (sans-IO).

What a server sends a client (https://docs.nats.io/reference/reference-protocols/nats-protocol):
``INFO {json}``, ``MSG <subject> <sid> [reply] <size>``, ``HMSG <subject> <sid> [reply]
<header size> <total size>`` (each followed by its payload and CRLF), ``PING``, ``PONG``,
``+OK`` and ``-ERR <message>``. ``Parser.feed`` takes the bytes as they arrive, split
anywhere; ``Parser.operations`` returns the complete operations received, as plain tuples
(this is the per-message path of the ingest, so no objects per message):

    (kind, subject, sid, reply, headers, payload)

``kind`` is one of ``MSG``, ``HMSG``, ``PING``, ``PONG``, ``OK``, ``ERR``, ``INFO``. For MSG
and HMSG the other fields are the message's (``reply`` empty when there is none, ``headers``
the whole header block, ``NATS/1.0 ...`` to its blank line, empty for MSG); ``INFO`` carries
its JSON in ``payload`` (``decode_info``), ``ERR`` its message; the others are empty.

Nothing grows without bound: a control line longer than ``max_control_line``, a header block
over ``max_header`` or a payload over ``max_payload`` is a ``ProtocolError`` (as is any line
that is not one of the operations above, or a payload not followed by CR: the LF after it is
not checked, to keep the per-message path short), and the connection should be dropped: the
stream cannot be resynchronised. The header block is handed on as it came (``status`` and
``header_fields`` read it, when the caller needs to).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

MSG: Final = 0
HMSG: Final = 1
PING: Final = 2
PONG: Final = 3
OK: Final = 4
ERR: Final = 5
INFO: Final = 6

Op = tuple[int, bytes, bytes, bytes, bytes, bytes]
"""``(kind, subject, sid, reply, headers, payload)``."""

MAX_CONTROL_LINE = 64 * 1024
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 64 * 1024 * 1024
"""nats-server's ``max_payload`` can be at most 64 MiB."""

_PING: Op = (PING, b"", b"", b"", b"", b"")
_PONG: Op = (PONG, b"", b"", b"", b"", b"")
_OK: Op = (OK, b"", b"", b"", b"", b"")


class ProtocolError(Exception):
    """The bytes are not the NATS protocol (or exceed a limit): drop the connection."""


class Parser:
    """Parses what a NATS server sends; see the module's docstring."""

    __slots__ = ("_data", "_position", "max_control_line", "max_header", "max_payload")

    def __init__(
        self,
        max_control_line: int = MAX_CONTROL_LINE,
        max_header: int = MAX_HEADER,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.max_control_line = max_control_line
        self.max_header = max_header
        self.max_payload = max_payload
        self._data = b""
        self._position = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as operations."""
        return len(self._data) - self._position

    def feed(self, data: bytes | bytearray) -> None:
        """Bytes as they arrived (any part of any operation)."""
        if self._position < len(self._data):
            self._data = self._data[self._position :] + data
        else:
            self._data = bytes(data)
        self._position = 0

    def operations(self, limit: int = 256) -> list[Op]:
        """The complete operations received, at most ``limit`` of them (call again for more:
        fewer than ``limit`` means the rest has not all arrived). Raises ``ProtocolError`` (after
        returning the operations before the error)."""
        ops: list[Op] = []
        append = ops.append
        data = self._data
        size = len(data)
        find = data.find
        position = self._position
        max_line = self.max_control_line
        max_header = self.max_header
        max_payload = self.max_payload
        try:
            for _ in range(limit):
                end = find(b"\r\n", position)
                if end < 0:
                    if size - position > max_line:
                        raise ProtocolError("control line too long")
                    break
                if end - position > max_line:
                    raise ProtocolError("control line too long")
                args = data[position:end].split()
                verb = args[0]  # IndexError: an empty line
                if verb == b"HMSG":
                    count = len(args)
                    if count == 6:
                        _, subject, sid, reply, header_size, total = args
                    elif count == 5:
                        _, subject, sid, header_size, total = args
                        reply = b""
                    else:
                        raise ProtocolError(f"malformed HMSG {data[position:end]!r}")
                    body = int(header_size)
                    stop = int(total)
                    if not 0 <= body <= stop or body > max_header:
                        raise ProtocolError(f"bad header size {data[position:end]!r}")
                    if stop > max_payload:
                        raise ProtocolError(f"message too large {data[position:end]!r}")
                    start = end + 2
                    body += start
                    stop += start
                    if size < stop + 2:
                        break  # the payload has not all arrived
                    if data[stop] != 13:  # (the LF after it is taken on trust: cheaper)
                        raise ProtocolError("message payload not followed by CRLF")
                    position = stop + 2
                    append((1, subject, sid, reply, data[start:body], data[body:stop]))  # HMSG
                elif verb == b"MSG":
                    count = len(args)
                    if count == 5:
                        _, subject, sid, reply, total = args
                    elif count == 4:
                        _, subject, sid, total = args
                        reply = b""
                    else:
                        raise ProtocolError(f"malformed MSG {data[position:end]!r}")
                    stop = int(total)
                    if not 0 <= stop <= max_payload:
                        raise ProtocolError(f"bad message size {data[position:end]!r}")
                    start = end + 2
                    stop += start
                    if size < stop + 2:
                        break  # the payload has not all arrived
                    if data[stop] != 13:  # (the LF after it is taken on trust: cheaper)
                        raise ProtocolError("message payload not followed by CRLF")
                    position = stop + 2
                    append((0, subject, sid, reply, b"", data[start:stop]))  # MSG
                else:
                    append(self._control(data[position:end], verb.upper()))
                    position = end + 2
        except ProtocolError:
            if ops:
                return ops  # those before it first; the next call raises again
            raise
        except (ValueError, IndexError):  # int() of a size that is not a number; no verb
            if ops:
                return ops
            raise ProtocolError(f"malformed line {data[position:end]!r}") from None
        finally:
            self._position = position
        return ops

    def _control(self, line: bytes, verb: bytes) -> Op:
        """A line that is not a message (or a message verb in lower case)."""
        if verb == b"PING":
            return _PING
        if verb == b"PONG":
            return _PONG
        if verb == b"+OK":
            return _OK
        if verb == b"-ERR":
            return (ERR, b"", b"", b"", b"", line[4:].strip())
        if verb == b"INFO":
            return (INFO, b"", b"", b"", b"", line[4:].strip())
        if verb in (b"MSG", b"HMSG"):
            raise ProtocolError(f"malformed {verb.decode()} (only upper case is read)")
        raise ProtocolError(f"unknown operation {line[:40]!r}")


# ---- reading what an operation carries (not on the per-message path) ------------------------


def decode_info(payload: bytes) -> dict[str, Any]:
    """The JSON of an INFO (an empty dict if it is not a JSON object)."""
    try:
        info = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def status(headers: bytes) -> tuple[int, bytes]:
    """The status of an HMSG's header block (``NATS/1.0 503``, ``NATS/1.0 100 Idle
    Heartbeat``): its code and description; 0 and empty when it has none (a message with
    headers, not a status)."""
    line = headers.split(b"\r\n", 1)[0]
    fields = line.split(None, 2)
    if len(fields) < 2 or not fields[1].isdigit():
        return 0, b""
    return int(fields[1]), fields[2].strip() if len(fields) == 3 else b""


def header_fields(headers: bytes) -> dict[bytes, bytes]:
    """An HMSG's headers (the last value of a repeated name), names as sent, values
    stripped."""
    fields: dict[bytes, bytes] = {}
    for line in headers.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name:
            fields[name.strip()] = value.strip()
    return fields

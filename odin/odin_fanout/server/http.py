"""HTTP on the WebSocket port: read a request head with h11, answer plain requests.

Odin serves ``/ws`` (upgrade), ``/health``, ``/ready`` and ``/metrics`` on one port, as the
original did, so one address is enough for clients, health checks and Prometheus. h11 parses
and writes HTTP; this module only routes. A request head that is not an upgrade gets a
complete response and the connection is closed (no keep-alive: these are rare requests).
"""

from __future__ import annotations

import urllib.parse
from http import HTTPStatus

import attrs
import h11
import trio

# Headers every plain response carries.
_COMMON_HEADERS = [(b"Connection", b"close"), (b"Cache-Control", b"no-store")]


@attrs.frozen
class RequestHead:
    method: str
    path: str
    """The target without its query string."""
    query: str
    """The query string, without the ``?`` (empty if none)."""
    headers: dict[str, str]
    """Lower-case names; repeated headers joined with ", "."""
    trailing: bytes = b""
    """Bytes the client sent after the head (the first WebSocket frames of an eager client)."""
    parser: h11.Connection | None = attrs.field(default=None, eq=False, repr=False)
    """The h11 connection that read the head, holding what came after it: ``read_body``
    reads the request's body with it."""

    @property
    def is_websocket_upgrade(self) -> bool:
        return self.method == "GET" and "websocket" in self.headers.get("upgrade", "").lower()

    @property
    def subprotocols(self) -> list[str]:
        """The ``Sec-WebSocket-Protocol`` values the client offers, in its order."""
        offered = self.headers.get("sec-websocket-protocol", "")
        return [name.strip() for name in offered.split(",") if name.strip()]

    def query_values(self, name: str) -> list[str]:
        return urllib.parse.parse_qs(self.query, keep_blank_values=True).get(name, [])


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_request_head(stream: trio.abc.ReceiveStream, max_size: int) -> RequestHead | None:
    """Read up to the end of one request head; None if the peer went away first."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=max_size)
    raw = bytearray()
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            raise BadRequest(status, str(exc) or "malformed request") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                return None
            raw += data
            if len(raw) > max_size:
                # h11 enforces its limit only while the head is incomplete; a head that
                # completes in the same read as it crosses the limit must be refused too.
                raise BadRequest(431, "request head too large")
            connection.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            path, _, query = event.target.decode("latin-1").partition("?")
            return RequestHead(
                method=event.method.decode("ascii"),
                path=path,
                query=query,
                headers=headers,
                trailing=bytes(connection.trailing_data[0]),
                parser=connection,
            )
        return None


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def declared_length(head: RequestHead) -> int | None:
    """The body's ``Content-Length`` (h11 has checked it is a number), None if chunked."""
    value = head.headers.get("content-length")
    return int(value.split(",")[0]) if value is not None else None


def waiting_for_continue(head: RequestHead) -> bool:
    """The client sent ``Expect: 100-continue`` and waits for ``CONTINUE`` before its body."""
    parser = head.parser
    return parser is not None and parser.they_are_waiting_for_100_continue


async def read_body(stream: trio.abc.ReceiveStream, head: RequestHead, max_size: int) -> bytes:
    """The request's body (by ``Content-Length`` or chunked), read with the h11 connection
    that read its head; BadRequest (413) past ``max_size`` bytes, before reading them all
    when the length is declared; BadRequest (400) if the peer leaves or breaks framing."""
    connection = head.parser
    if connection is None:
        raise BadRequest(400, "no request to read a body of")
    declared = declared_length(head)
    if declared is not None and declared > max_size:
        raise BadRequest(413, f"the body is larger than {max_size} bytes")
    body = bytearray()
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(exc.error_status_hint, str(exc) or "malformed request") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                raise BadRequest(400, "the body ended early")
            connection.receive_data(bytes(data))
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_size:
                raise BadRequest(413, f"the body is larger than {max_size} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise BadRequest(400, "malformed request")


def response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response, serialised by h11."""
    writer = h11.Connection(h11.SERVER)
    # h11 writes a response only after it has read the request it answers; the real request
    # was read by another h11 connection, so show this one the same method.
    method = b"HEAD" if head_only else b"GET"
    writer.receive_data(method + b" / HTTP/1.1\r\nHost: odin\r\n\r\n")
    writer.next_event()
    all_headers = [
        *_COMMON_HEADERS,
        (b"Content-Type", content_type.encode()),
        (b"Content-Length", str(len(body)).encode()),
        *(headers or []),
    ]
    data = (
        writer.send(
            h11.Response(
                status_code=status, headers=all_headers, reason=HTTPStatus(status).phrase.encode()
            )
        )
        or b""
    )
    if body and not head_only:
        data += writer.send(h11.Data(data=body)) or b""
    data += writer.send(h11.EndOfMessage()) or b""
    return data

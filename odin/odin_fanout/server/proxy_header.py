"""Read a PROXY protocol header off a connection's raw stream, and not one byte more.

The parser (odin_fanout.core.proxy_protocol) says how many bytes the header needs at least;
asking the stream for no more than that never reads into what follows (the HTTP request, or a TLS
client hello), so nothing has to be handed back to whatever reads next. On a socket the first bytes
are peeked (MSG_PEEK) so that a whole header, the usual case, is read in one call.
"""

from __future__ import annotations

import trio

from odin_fanout.core.proxy_protocol import V1_MAX, ProxyHeader, ProxyHeaderError, parse

# Peeked at once: a v1 header whole, and a v2 header with its addresses and a few TLVs.
_PEEK = 512


async def read_proxy_header(stream: trio.abc.ReceiveStream) -> ProxyHeader | None:
    """The header at the start of ``stream``; None if the peer closed before sending anything;
    ProxyHeaderError if what it sent is not a header (or it closed in the middle of one)."""
    data = bytearray()
    if isinstance(stream, trio.SocketStream):
        peeked = await stream.socket.recv(max(_PEEK, V1_MAX), trio.socket.MSG_PEEK)
        if not peeked:
            return None
        result = parse(peeked)
        if isinstance(result, ProxyHeader):
            await _read_exactly(stream, result.length)
            return result
    while True:
        result = parse(bytes(data))
        if isinstance(result, ProxyHeader):
            return result
        chunk = await stream.receive_some(result)
        if not chunk:
            if not data:
                return None
            raise ProxyHeaderError("connection closed in the PROXY protocol header")
        data += chunk


async def _read_exactly(stream: trio.abc.ReceiveStream, count: int) -> None:
    while count > 0:
        chunk = await stream.receive_some(count)
        if not chunk:
            raise ProxyHeaderError("connection closed in the PROXY protocol header")
        count -= len(chunk)

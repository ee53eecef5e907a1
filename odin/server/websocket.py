"""trio-websocket's server connection, with a hook and a fix.

The hook: every ping or pong from the peer is reported, so liveness counts control frames too
(trio-websocket handles them internally and tells the application nothing).

The fix: when our side has sent its close frame (wsproto state LOCAL_CLOSING) and the peer's ping
arrives before its close reply, trio-websocket answers the ping, wsproto refuses to send a
pong in that state, and the ``LocalProtocolError`` ends the connection's nursery with a
traceback (python-trio/trio-websocket#184; the fix in PR #198 is not released). A ping that
races our close needs no answer, so it is dropped here.

``wrap_server_stream`` below is trio-websocket's function of the same name (three lines),
using this class. It touches private members, so trio-websocket is pinned below 0.13.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import Ping, Pong


class OdinWebSocket(WebSocketConnection):
    on_control_frame: Callable[[], None] | None = None
    """Called for every ping or pong from the peer: they prove it alive, like data frames."""

    async def _handle_ping_event(self, event: Ping) -> None:
        if self.on_control_frame is not None:
            self.on_control_frame()
        if self._wsproto.state is ConnectionState.OPEN:
            await super()._handle_ping_event(event)

    async def _handle_pong_event(self, event: Pong) -> None:
        if self.on_control_frame is not None:
            self.on_control_frame()
        await super()._handle_pong_event(event)


async def wrap_server_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    message_queue_size: int,
    max_message_size: int,
) -> WebSocketRequest:
    """trio-websocket's ``wrap_server_stream``, building an ``OdinWebSocket``."""
    connection = OdinWebSocket(
        stream,
        WSConnection(ConnectionType.SERVER),
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
    )
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


async def accept(request: WebSocketRequest, subprotocol: str | None = None) -> OdinWebSocket:
    """Complete the handshake of a request made by ``wrap_server_stream``, echoing
    ``subprotocol`` if given."""
    connection = await request.accept(subprotocol=subprotocol)
    assert isinstance(connection, OdinWebSocket)
    return connection

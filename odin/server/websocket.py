"""trio-websocket's server connection, with one fix: no pong after our close frame.

When our side has sent its close frame (wsproto state LOCAL_CLOSING) and the peer's ping
arrives before its close reply, trio-websocket answers the ping, wsproto refuses to send a
pong in that state, and the ``LocalProtocolError`` ends the connection's nursery with a
traceback (python-trio/trio-websocket#184; the fix in PR #198 is not released). A ping that
races our close needs no answer, so it is dropped here.

``wrap_server_stream`` below is trio-websocket's function of the same name (three lines),
using this class. It touches private members, so trio-websocket is pinned below 0.13.
"""

from __future__ import annotations

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import Ping


class OdinWebSocket(WebSocketConnection):
    async def _handle_ping_event(self, event: Ping) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            await super()._handle_ping_event(event)


async def wrap_server_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    message_queue_size: int,
    max_message_size: int,
) -> WebSocketRequest:
    connection = OdinWebSocket(
        stream,
        WSConnection(ConnectionType.SERVER),
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
    )
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()

"""In-memory byte streams with a bounded buffer, and a listener that hands them to the server.

``trio.testing.memory_stream_pair`` buffers without limit, so a server writing to a client
that does not read never feels it: its writer's ``send_all`` always returns at once and the
slow-consumer policy never triggers. These pipes hold at most ``capacity`` bytes per
direction; ``send_all`` waits for the reader to make room, as a socket's does.
"""

from __future__ import annotations

import trio


class _Buffer:
    __slots__ = ("capacity", "data", "lot", "receive_closed", "send_closed")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data = bytearray()
        self.send_closed = False
        self.receive_closed = False
        self.lot = trio.lowlevel.ParkingLot()


class PipeSendStream(trio.abc.SendStream):
    def __init__(self, buffer: _Buffer) -> None:
        self._buffer = buffer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        buffer = self._buffer
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while True:
            if buffer.send_closed:
                raise trio.ClosedResourceError("this end is closed")
            if buffer.receive_closed:
                raise trio.BrokenResourceError("the reader is gone")
            if not view:
                break
            room = buffer.capacity - len(buffer.data)
            if room <= 0:
                await buffer.lot.park()
                continue
            buffer.data += view[:room]
            view = view[room:]
            buffer.lot.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        buffer = self._buffer
        while len(buffer.data) >= buffer.capacity and not buffer.receive_closed:
            await buffer.lot.park()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._buffer.send_closed = True
        self._buffer.lot.unpark_all()
        await trio.lowlevel.checkpoint()


class PipeReceiveStream(trio.abc.ReceiveStream):
    def __init__(self, buffer: _Buffer) -> None:
        self._buffer = buffer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        buffer = self._buffer
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if buffer.receive_closed:
                raise trio.ClosedResourceError("this end is closed")
            if buffer.data or buffer.send_closed:
                break
            await buffer.lot.park()
        size = len(buffer.data) if max_bytes is None else min(max_bytes, len(buffer.data))
        chunk = bytes(buffer.data[:size])
        del buffer.data[:size]
        buffer.lot.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return chunk

    async def aclose(self) -> None:
        buffer = self._buffer
        buffer.receive_closed = True
        buffer.data.clear()
        buffer.lot.unpark_all()
        await trio.lowlevel.checkpoint()


def pipe_pair(
    *, to_client: int, to_server: int
) -> tuple[trio.StapledStream[PipeSendStream, PipeReceiveStream], trio.abc.Stream]:
    """(client end, server end): ``to_client`` bytes may wait for the client to read them,
    ``to_server`` for the server."""
    down, up = _Buffer(to_client), _Buffer(to_server)
    client = trio.StapledStream(PipeSendStream(up), PipeReceiveStream(down))
    server = trio.StapledStream(PipeSendStream(down), PipeReceiveStream(up))
    return client, server


class PipeListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are bounded pipes (``connect`` is the client's dial)."""

    def __init__(self, *, to_client: int, to_server: int = 65536) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](10_000)
        self._sizes = (to_client, to_server)
        self.connected = 0

    async def connect(
        self, to_client: int | None = None
    ) -> trio.StapledStream[PipeSendStream, PipeReceiveStream]:
        client, server = pipe_pair(to_client=to_client or self._sizes[0], to_server=self._sizes[1])
        self.connected += 1
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

"""A Server-Sent Events reader for the tests, parsing the stream as the HTML standard says a
browser's EventSource does (fields ``event``, ``data``, ``id``, ``retry``; comments; an id
set by a block without data), over a plain TCP connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio


@attrs.define
class SseEvent:
    event: str
    """``message`` for an unnamed event, as EventSource names it."""
    data: str
    last_event_id: str

    def json(self) -> Any:
        return json.loads(self.data)


@attrs.define
class SseStream:
    status: int
    headers: dict[str, str]
    body: bytes
    """Everything after the head (for a refusal: its whole body)."""
    _stream: trio.abc.Stream
    _buffer: bytes = b""
    last_event_id: str = ""
    retry: int | None = None
    ended: bool = False

    async def next(self, timeout: float = 5) -> SseEvent:
        """The next dispatched event; raises EOFError when the server ends the stream."""
        with trio.fail_after(timeout):
            while True:
                found = await self._block()
                if found is not None:
                    return found

    async def until_id(self, timeout: float = 5) -> str:
        """Read until the last event id is set (a block without data sets it too)."""
        with trio.fail_after(timeout):
            while not self.last_event_id:
                await self._block()
        return self.last_event_id

    async def _block(self) -> SseEvent | None:
        """Read one block (to its blank line): the event it dispatches, if any."""
        event, data = "", list[str]()
        while True:
            line = await self._line()
            if line is None:
                raise EOFError("the stream ended")
            if not line:
                if data:
                    return SseEvent(event or "message", "\n".join(data), self.last_event_id)
                return None
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                self.last_event_id = value
            elif name == "retry" and value.isdigit():
                self.retry = int(value)

    async def until(self, event: str, timeout: float = 5) -> SseEvent:
        """Skip to the next event of that name."""
        with trio.fail_after(timeout):
            while True:
                found = await self.next(timeout)
                if found.event == event:
                    return found

    async def messages(self, count: int, timeout: float = 5) -> list[dict[str, Any]]:
        """The next ``count`` unnamed events (envelopes), skipping named ones."""
        found: list[dict[str, Any]] = []
        with trio.fail_after(timeout):
            while len(found) < count:
                event = await self.next(timeout)
                if event.event == "message":
                    found.append(event.json())
        return found

    async def _line(self) -> str | None:
        while True:
            for separator in (b"\r\n", b"\n", b"\r"):
                index = self._buffer.find(separator)
                if index >= 0 and not (separator == b"\r" and index == len(self._buffer) - 1):
                    line = self._buffer[:index]
                    self._buffer = self._buffer[index + len(separator) :]
                    return line.decode()
            if self.ended:
                return None
            data = await self._stream.receive_some(65536)
            if not data:
                self.ended = True
                if not self._buffer:
                    return None
                self._buffer += b"\n"
            self._buffer += data


@asynccontextmanager
async def open_sse(
    port: int, query: str, headers: dict[str, str] | None = None, path: str = "/sse"
) -> AsyncIterator[SseStream]:
    """``GET /sse?<query>`` on 127.0.0.1:port; the stream once its head has come."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        lines = [f"GET {path}?{query} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in received:
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        status = int(status_line.split()[1])
        parsed = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            parsed[name.strip().lower()] = value.strip()
        sse = SseStream(status, parsed, rest, stream, rest)
        if status != 200:
            with trio.move_on_after(2):
                while data := await stream.receive_some(65536):
                    sse.body += data
        yield sse
    finally:
        await stream.aclose()

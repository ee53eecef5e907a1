"""The load generator: N WebSocket subscribers in one process, on raw asyncio (uvloop if found).

Each connection is an ``asyncio.Protocol`` with its own minimal HTTP/1.1 upgrade (no
extensions, so no compression; the ``Sec-WebSocket-Accept`` is checked) and masked client
frames. Connections open in batches (100 at a time), each sends
``{"type":"subscribe","data":{"channels":["BENCH.trade"]}}`` and counts as subscribed once a
text frame containing ``subscription_ack`` comes back.

Every frame on every connection is delimited and checked (FIN set, no RSV bits, known opcode,
not masked by the server): a frame failing that counts as a bad frame. Every
``--parse-every``-th connection also decodes each data frame as JSON, takes the payload (the
object itself, or its ``data`` member for Odin's envelope), checks ``seq`` follows on, and
records the latency ``monotonic_ns() at receipt - ns`` (one clock for the whole machine), and
the latency from the message's scheduled time ``due``, which also counts the time a publisher
sharing its loop with the broadcast fell behind its schedule.

Protocol with the driver, one JSON line per event on stdout:
``{"event": "ready", ...}`` once every connection is subscribed (or failed); then the driver
writes ``go`` (measure ``--duration`` plus ``--drain`` seconds, then print the result) or
``stop`` (print the result at once: the idle-memory mode). The result is
``{"event": "result", ...}``. The connections stay open after it until stdin closes (or a line
or ``--linger`` seconds come), so the driver can stop the server first. The process bounds
every wait and exits by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - the project's venv has orjson
    _loads = json.loads

try:
    import uvloop
except ImportError:  # pragma: no cover - optional
    uvloop = None  # type: ignore[assignment]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBSCRIBE = b'{"type":"subscribe","data":{"channels":["BENCH.trade"]}}'
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A complete masked client frame (RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big") if length else 0
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big") if length else b""
    return header + mask + masked


class Stats:
    """What all connections share: the phase, the latency samples and the error tallies."""

    def __init__(self) -> None:
        self.measuring = False
        self.latencies_ns: list[int] = []
        self.sched_latencies_ns: list[int] = []
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[int] = Counter()


class Subscriber(asyncio.Protocol):
    def __init__(self, stats: Stats, request: bytes, key: bytes, parse: bool) -> None:
        self.stats = stats
        self.request = request
        self.accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.parse = parse
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.subscribed = False
        self.head = b""
        self.buf = b""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Counted only while measuring (after "go").
        self.frames = 0
        self.bytes = 0
        self.first_ns = 0
        self.last_ns = 0
        self.unmeasured_frames = 0
        self.bad_frames = 0
        self.bad_payloads = 0
        self.other_frames = 0
        self.seq_errors = 0
        self.last_seq = -1
        self.pings = 0
        self.lost = False
        self.closed_by_server = False

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before subscribed: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            # Fast path: exactly one unmasked FIN text frame of < 64 KiB in the chunk (usual).
            size = len(data)
            if self.subscribed and not self.buf and size >= 2 and data[0] == 0x81:
                length = data[1]
                header = 2
                if length == 126 and size >= 4:
                    length = (data[2] << 8) | data[3]
                    header = 4
                elif length >= 126:
                    header = -1  # a 64-bit length, or a mask bit: the general path
                if header > 0 and size == header + length:
                    if not self.stats.measuring:
                        self.unmeasured_frames += 1
                        return
                    self.frames += 1
                    self.bytes += size
                    self.last_ns = now = time.monotonic_ns()
                    if not self.first_ns:
                        self.first_ns = now
                    if self.parse:
                        self._payload(data[header:], now)
                    return
            self._frames(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 16384:
                self._fail("handshake: response head too large")
            return
        head, rest = self.head[:end], self.head[end + 4 :]
        self.head = b""
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            self._fail(f"handshake: {lines[0][:60].decode(errors='replace')}")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"sec-websocket-accept") != self.accept:
            self._fail("handshake: bad Sec-WebSocket-Accept")
            return
        if b"sec-websocket-extensions" in headers:
            self._fail("handshake: server negotiated an extension")
            return
        self.upgraded = True
        assert self.transport is not None
        self.transport.write(client_frame(OP_TEXT, SUBSCRIBE))
        if rest:
            self._frames(rest)

    # ---- frames --------------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        size = len(data)
        pos = 0
        now = 0
        while pos + 2 <= size:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if pos + 4 > size:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if pos + 10 > size:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                header = 10
            if b1 & 0x80:  # servers never mask
                header += 4
                self._bad("masked server frame")
            end = pos + header + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if b0 & 0x70 or opcode not in _KNOWN_OPCODES:
                self._bad("reserved bits or opcode")
            elif not b0 & 0x80 or opcode == OP_CONT:
                self._bad("fragmented")  # none of the servers fragments small messages
            elif opcode in (OP_TEXT, OP_BINARY):
                if not self.subscribed:
                    if b"subscription_ack" in data[pos + header : end]:
                        self.subscribed = True
                        if not self.ready.done():
                            self.ready.set_result(None)
                elif not self.stats.measuring:
                    self.unmeasured_frames += 1
                else:
                    if not now:
                        now = time.monotonic_ns()
                        self.last_ns = now
                        if not self.first_ns:
                            self.first_ns = now
                    self.frames += 1
                    self.bytes += end - pos
                    if self.parse:
                        self._payload(data[pos + header : end], now)
            elif opcode == OP_PING:
                self.pings += 1
                if self.transport is not None:
                    self.transport.write(client_frame(OP_PONG, data[pos + header : end]))
            elif opcode == OP_CLOSE:
                body = data[pos + header : end]
                code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
                self.stats.close_codes[code] += 1
                self.closed_by_server = True
                if self.transport is not None:
                    self.transport.write(client_frame(OP_CLOSE, body[:2]))
                    self.transport.close()
            pos = end
        if pos < size:
            self.buf = data[pos:]

    def _payload(self, payload: bytes, now: int) -> None:
        try:
            document = _loads(payload)
            inner = document.get("data", document)
            ns = inner["ns"]
            seq = inner["seq"]
            due = inner.get("due", ns)
        except Exception:  # invalid UTF-8 or JSON, or not a benchmark payload
            self.other_frames += 1
            if not payload.startswith(b"{"):
                self.bad_payloads += 1
            return
        self.stats.latencies_ns.append(now - ns)
        self.stats.sched_latencies_ns.append(now - due)
        if self.last_seq >= 0 and seq != self.last_seq + 1:
            self.seq_errors += 1
        self.last_seq = seq

    def _bad(self, why: str) -> None:
        self.bad_frames += 1
        self.stats.errors[f"bad_frame: {why}"] += 1

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="connections opened at once")
    parser.add_argument("--parse-every", type=int, default=20, help="every k-th conn parses")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--drain", type=float, default=3.0)
    parser.add_argument("--connect-timeout", type=float, default=30.0, help="per connection")
    parser.add_argument("--wait-timeout", type=float, default=300.0, help="for a command")
    parser.add_argument("--linger", type=float, default=30.0, help="after the result")
    parser.add_argument("--no-uvloop", action="store_true")
    return parser.parse_args()


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed and soft != resource.RLIM_INFINITY:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def stdin_commands(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """Commands from stdin, read by a daemon thread (it must not keep the process alive)."""
    queue: asyncio.Queue[str] = asyncio.Queue()

    def reader() -> None:
        while True:
            command = sys.stdin.readline().strip()
            loop.call_soon_threadsafe(queue.put_nowait, command)
            if command in ("", "exit"):
                return

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue


def percentile(ordered: list[int], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 3)


def summary(ordered: list[int]) -> dict[str, float | None]:
    return {
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "max": round(ordered[-1] / 1e6, 3) if ordered else None,
    }


async def open_one(
    args: argparse.Namespace, stats: Stats, index: int, subscribers: list[Subscriber]
) -> None:
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    parse = index % args.parse_every == 0
    try:
        async with asyncio.timeout(args.connect_timeout):
            _, protocol = await loop.create_connection(
                lambda: Subscriber(stats, request, key, parse), args.host, args.port
            )
            subscribers.append(protocol)
            await protocol.ready
    except Exception as exc:
        stats.errors[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    commands = stdin_commands(loop)
    stats = Stats()
    subscribers: list[Subscriber] = []
    started = time.monotonic()
    cpu_start = cpu_seconds()
    for first in range(0, args.connections, args.batch):
        batch = range(first, min(args.connections, first + args.batch))
        await asyncio.gather(*(open_one(args, stats, i, subscribers) for i in batch))
    subscribed = [s for s in subscribers if s.subscribed and not s.lost]
    connect_s = time.monotonic() - started
    emit(
        "ready",
        connected=len(subscribed),
        connect_errors=args.connections - len(subscribed),
        connect_s=round(connect_s, 3),
        setup_cpu_s=round(cpu_seconds() - cpu_start, 3),
        errors=dict(stats.errors),
    )
    try:
        async with asyncio.timeout(args.wait_timeout):
            command = await commands.get()
    except TimeoutError:
        command = "timeout"
    window = 0.0
    cpu_window = 0.0
    go_ns = time.monotonic_ns()
    if command == "go":
        stats.measuring = True
        cpu_go = cpu_seconds()
        go_ns = time.monotonic_ns()
        emit("going")
        await asyncio.sleep(args.duration + args.drain)
        stats.measuring = False
        window = (time.monotonic_ns() - go_ns) / 1e9
        cpu_window = cpu_seconds() - cpu_go
    report(args, stats, subscribers, subscribed, command, window, cpu_window, go_ns, connect_s)
    # Keep the connections open until the driver has stopped the server (end of input or any
    # line), so the server never handles a mass disconnect while it is being measured.
    if command in ("go", "stop"):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.linger):
                await commands.get()
    for subscriber in subscribers:
        if subscriber.transport is not None:
            subscriber.transport.abort()


def report(
    args: argparse.Namespace,
    stats: Stats,
    subscribers: list[Subscriber],
    subscribed: list[Subscriber],
    command: str,
    window: float,
    cpu_window: float,
    go_ns: int,
    connect_s: float,
) -> None:
    delivered = sum(s.frames for s in subscribers)
    last_ns = max((s.last_ns for s in subscribers), default=0)
    first_ns = min((s.first_ns for s in subscribers if s.first_ns), default=0)
    span = (last_ns - go_ns) / 1e9 if last_ns > go_ns else 0.0
    per_conn = [s.frames for s in subscribed] or [0]
    ordered = sorted(stats.latencies_ns)
    ordered_sched = sorted(stats.sched_latencies_ns)
    emit(
        "result",
        command=command,
        connections=args.connections,
        connected=len(subscribed),
        connect_errors=args.connections - len(subscribed),
        connect_s=round(connect_s, 3),
        loop="uvloop" if uvloop is not None and not args.no_uvloop else "asyncio",
        window_s=round(window, 3),
        delivered=delivered,
        bytes=sum(s.bytes for s in subscribers),
        delivery_span_s=round(span, 3),
        go_ns=go_ns,
        first_delivery_ns=first_ns,
        last_delivery_ns=last_ns,
        delivered_per_s=round(delivered / span, 1) if span else 0.0,
        per_conn_min=min(per_conn),
        per_conn_max=max(per_conn),
        latency_samples=len(ordered),
        latency_ms=summary(ordered),
        latency_sched_ms=summary(ordered_sched),
        bad_frames=sum(s.bad_frames for s in subscribers),
        bad_payloads=sum(s.bad_payloads for s in subscribers),
        other_frames=sum(s.other_frames for s in subscribers),
        seq_errors=sum(s.seq_errors for s in subscribers),
        unmeasured_frames=sum(s.unmeasured_frames for s in subscribers),
        pings=sum(s.pings for s in subscribers),
        lost=sum(1 for s in subscribed if s.lost),
        closed_by_server=sum(1 for s in subscribed if s.closed_by_server),
        close_codes={str(code): n for code, n in stats.close_codes.items()},
        errors=dict(stats.errors),
        cpu_s=round(cpu_window, 3),
        cpu_pct=round(100 * cpu_window / window, 1) if window else 0.0,
        cpu_total_s=round(cpu_seconds(), 3),
    )


def main() -> None:
    args = parse_args()
    raise_fd_limit(args.connections + 64)
    if uvloop is not None and not args.no_uvloop:
        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()

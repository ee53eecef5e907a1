"""The load generator: N WebSocket subscribers in one process, on raw asyncio (uvloop if found).

Each connection is an ``asyncio.Protocol`` speaking RFC 6455 through
``odin_fanout.stress.wsclient``: its own minimal HTTP/1.1 upgrade (no extensions, so no compression;
the ``Sec-WebSocket-Accept`` is checked) and masked client frames. Connections open in batches (100
at a time). With ``--protocol json`` (the default: Odin and the WebSocket peers) each sends
``{"type":"subscribe","data":{"channels":["BENCH.trade"]}}`` and counts as subscribed once a
text frame containing ``subscription_ack`` comes back. With ``--protocol nats`` (nats-server's
WebSocket listener) each sends ``CONNECT``, ``SUB BENCH.trade 1`` and ``PING`` in one binary
frame and counts as subscribed on the ``PONG``; every ``MSG`` is then one delivery (nats-server
packs several into one frame, and an operation cut by a frame boundary is joined to the rest),
and a ``PING`` from the server is answered with ``PONG``.

Every frame on every connection is delimited and checked (FIN set, no RSV bits, known opcode,
not masked by the server): a frame failing that counts as a bad frame. A chunk that is exactly
one unmasked text frame (binary for NATS) of < 64 KiB, the usual case, takes a fast path;
anything else goes through ``wsclient.FrameReader``. Every ``--parse-every``-th connection
also decodes each payload as JSON, takes the benchmark payload (the object itself, or its
``data`` member for Odin's envelope), checks ``seq`` follows on, and records the latency
``monotonic_ns() at receipt - ns`` (one clock for the whole machine), and the latency from the
message's scheduled time ``due``, which also counts the time a publisher sharing its loop with
the broadcast fell behind its schedule.

Protocol with the driver, one JSON line per event on stdout:
``{"event": "ready", ...}`` once every connection is subscribed (or failed); then the driver
writes ``go`` (measure ``--duration`` plus ``--drain`` seconds, then print the result; with
``--expect M``, stop as soon as every subscribed connection has M deliveries: the burst mode)
or ``stop`` (print the result at once: the idle-memory mode). The result is
``{"event": "result", ...}``; with ``--samples`` it also carries every latency sample (so that
a driver can merge several client processes). The connections stay open after it until stdin
closes (or a line or ``--linger`` seconds come), so the driver can stop the server first. The
process raises its soft limit on open files to the hard one, bounds every wait and exits by
itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from odin_fanout.stress.wsclient import (
    MAX_HEAD,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    check_upgrade,
    client_frame,
    upgrade_request,
)

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - the project's venv has orjson
    _loads = json.loads

try:
    import uvloop
except ImportError:  # pragma: no cover - optional
    uvloop = None  # type: ignore[assignment]

SUBSCRIBE = b'{"type":"subscribe","data":{"channels":["BENCH.trade"]}}'
NATS_SUBSCRIBE = (
    b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\nSUB BENCH.trade 1\r\nPING\r\n'
)
NATS_PONG = b"PONG\r\n"


def frame_size(length: int) -> int:
    """Bytes on the wire of an unmasked server frame whose payload is ``length`` bytes."""
    return length + (2 if length < 126 else 4 if length < 1 << 16 else 10)


class Stats:
    """What all connections share: the phase, the latency samples and the error tallies."""

    def __init__(self) -> None:
        self.measuring = False
        self.latencies_ns: list[int] = []
        self.sched_latencies_ns: list[int] = []
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[int] = Counter()


class Subscriber(asyncio.Protocol):
    """One connection subscribing the Odin way (Odin and the WebSocket peers)."""

    def __init__(self, stats: Stats, request: bytes, accept: bytes, parse: bool) -> None:
        self.stats = stats
        self.request = request
        self.accept = accept
        self.parse = parse
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.subscribed = False
        self.head = b""
        self.reader = FrameReader()
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
        if not self.upgraded:
            self._handshake(data)
            return
        # Fast path: exactly one unmasked FIN text frame of < 64 KiB in the chunk (usual),
        # when the reader holds no start of a frame (its buffer, read directly: a property
        # would cost more than the rest of this test).
        size = len(data)
        if self.subscribed and size >= 2 and data[0] == 0x81 and not self.reader._buffer:
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

    # ---- the upgrade ---------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD:
                self._fail("handshake: response head too large")
            return
        head, rest = self.head[:end], self.head[end + 4 :]
        self.head = b""
        problem = check_upgrade(head, self.accept)
        if problem is not None:
            self._fail(problem)
            return
        self.upgraded = True
        self._subscribe()
        if rest:
            self._frames(rest)

    def _subscribe(self) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(OP_TEXT, SUBSCRIBE))

    # ---- frames --------------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        """The general path: every frame of the chunk, through ``wsclient.FrameReader``."""
        now = 0
        for opcode, payload in self.reader.feed(data):
            if opcode not in (OP_TEXT, OP_BINARY):
                self._control(opcode, payload)
            elif not self.subscribed:
                if b"subscription_ack" in payload:
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
                length = len(payload)
                self.bytes += length + (2 if length < 126 else 4 if length < 1 << 16 else 10)
                if self.parse:
                    self._payload(payload, now)

    def _control(self, opcode: int, payload: bytes) -> None:
        """A frame that breaks the rules (``opcode`` -1), a ping, a close (a pong: nothing)."""
        if opcode < 0:
            self._bad(payload.decode())
        elif opcode == OP_PING:
            self.pings += 1
            if self.transport is not None:
                self.transport.write(client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.stats.close_codes[code] += 1
            self.closed_by_server = True
            if self.transport is not None:
                self.transport.write(client_frame(OP_CLOSE, payload[:2]))
                self.transport.close()

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


class NatsSubscriber(Subscriber):
    """One connection speaking NATS over WebSocket (nats-server's listener). A delivery is one
    ``MSG``; nats-server packs several into one binary frame."""

    def __init__(self, stats: Stats, request: bytes, accept: bytes, parse: bool) -> None:
        super().__init__(stats, request, accept, parse)
        self.pending = b""  # the start of a NATS operation that a frame boundary cut
        self.msg_head = b""  # the first MSG's line, and its size with payload and CRLF:
        self.msg_size = 0  # a frame of k such MSGs only is counted without a loop
        self.ws_frames = 0

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self._handshake(data)
            return
        # Fast path: exactly one unmasked FIN binary frame of < 64 KiB in the chunk (usual).
        size = len(data)
        if size >= 2 and data[0] == 0x82 and not self.reader._buffer:
            length = data[1]
            header = 2
            if length == 126 and size >= 4:
                length = (data[2] << 8) | data[3]
                header = 4
            elif length >= 126:
                header = -1
            if header > 0 and size == header + length:
                msg_size = self.msg_size
                if (
                    msg_size
                    and self.stats.measuring
                    and not self.parse
                    and not self.pending
                    and length >= msg_size
                    and length % msg_size == 0
                    and data.startswith(self.msg_head, header)
                    and data.count(self.msg_head) * msg_size == length
                ):  # k MSGs like the first one and nothing else: the usual frame
                    self.frames += length // msg_size
                    self.ws_frames += 1
                    self.bytes += size
                    self.last_ns = now = time.monotonic_ns()
                    if not self.first_ns:
                        self.first_ns = now
                    return
                self._data(data[header:], size, 0)
                return
        self._frames(data)

    def _subscribe(self) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(OP_BINARY, NATS_SUBSCRIBE))

    def _frames(self, data: bytes) -> None:
        now = 0
        for opcode, payload in self.reader.feed(data):
            if opcode in (OP_TEXT, OP_BINARY):
                now = self._data(payload, frame_size(len(payload)), now)
            else:
                self._control(opcode, payload)

    def _data(self, payload: bytes, size: int, now: int) -> int:
        """One data frame of ``size`` bytes on the wire; returns ``now`` (0: not read yet)."""
        if not now:
            now = time.monotonic_ns()
        measuring = self.stats.measuring
        if measuring:
            self.ws_frames += 1
            self.bytes += size
        count = self._operations(payload, now, measuring)
        if count:
            if measuring:
                self.frames += count
                self.last_ns = now
                if not self.first_ns:
                    self.first_ns = now
            else:
                self.unmeasured_frames += count
        return now

    def _operations(self, data: bytes, now: int, measuring: bool) -> int:
        """Handle the NATS operations in ``data``; the number of ``MSG``s."""
        if self.pending:
            data = self.pending + data
            self.pending = b""
        size = len(data)
        msg_size = self.msg_size
        if (
            msg_size
            and not (self.parse and measuring)
            and size % msg_size == 0
            and data.startswith(self.msg_head)
            and data.count(self.msg_head) * msg_size == size
        ):
            return size // msg_size  # k MSGs like the first one, nothing else
        count = 0
        pos = 0
        while pos < size:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            if data.startswith(b"MSG ", pos):  # MSG <subject> <sid> [reply-to] <#bytes>
                start = eol + 2
                try:
                    end = start + int(data[data.rfind(b" ", pos, eol) + 1 : eol]) + 2
                except ValueError:
                    self._bad("NATS MSG line")
                    return count
                if end > size:
                    break
                count += 1
                if not msg_size:
                    self.msg_head = data[pos:start]
                    self.msg_size = msg_size = end - pos
                if self.parse and measuring:
                    self._payload(data[start : end - 2], now)
                pos = end
                continue
            line = data[pos:eol]
            pos = eol + 2
            if line == b"PING":
                self.pings += 1
                if self.transport is not None:
                    self.transport.write(client_frame(OP_BINARY, NATS_PONG))
            elif line == b"PONG":
                if not self.subscribed:
                    self.subscribed = True
                    if not self.ready.done():
                        self.ready.set_result(None)
            elif line.startswith(b"-ERR"):
                self.stats.errors[f"nats: {line[:80].decode(errors='replace')}"] += 1
            # INFO and +OK: nothing to do.
        if pos < size:
            self.pending = data[pos:]
        return count


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
    parser.add_argument(
        "--protocol",
        choices=("json", "nats"),
        default="json",
        help="json: Odin's subscribe (Odin and the WebSocket peers); nats: nats-server's",
    )
    parser.add_argument(
        "--expect",
        type=int,
        default=0,
        help="deliveries per connection after which the window ends early (burst mode)",
    )
    parser.add_argument(
        "--samples", action="store_true", help="put every latency sample in the result"
    )
    return parser.parse_args()


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
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
    request, accept = upgrade_request(args.host, args.port, args.path)
    parse = index % args.parse_every == 0
    kind = NatsSubscriber if args.protocol == "nats" else Subscriber
    try:
        async with asyncio.timeout(args.connect_timeout):
            _, protocol = await loop.create_connection(
                lambda: kind(stats, request, accept, parse), args.host, args.port
            )
            subscribers.append(protocol)
            await protocol.ready
    except Exception as exc:
        stats.errors[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1


async def measure(args: argparse.Namespace, subscribed: list[Subscriber]) -> None:
    """The measuring window: ``duration + drain``, or less with ``--expect`` once every
    subscribed connection has had its deliveries."""
    window = args.duration + args.drain
    if args.expect <= 0 or not subscribed:
        await asyncio.sleep(window)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    wanted = args.expect * len(subscribed)
    while loop.time() < deadline:
        await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        if sum(s.frames for s in subscribed) >= wanted:
            return


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
        await measure(args, subscribed)
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
    extra: dict[str, object] = {}
    if args.protocol != "json":
        extra["protocol"] = args.protocol
        extra["ws_frames"] = sum(getattr(s, "ws_frames", 0) for s in subscribers)
    if args.samples:
        extra["latency_ns"] = stats.latencies_ns
        extra["latency_sched_ns"] = stats.sched_latencies_ns
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
        **extra,
    )


def main() -> None:
    args = parse_args()
    raise_fd_limit()
    if uvloop is not None and not args.no_uvloop:
        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()

"""One load worker: a share of the run's clients in one process, on raw asyncio (uvloop when
installed), driven by ``odin_fanout.stress.cli``.

The coordinator writes the plan as one JSON line on stdin; the worker writes one JSON line
per second on stdout (``progress``) and a last one (``result``) with its counters and its
latency histograms (HdrHistogram encodings), then exits. It also exits when its stdin
closes or its deadline passes: a worker never outlives its run.

Each simulated user is a ``Session`` (its channels, its ``Continuity`` check, which survive
reconnects) that opens one ``Connection`` at a time. The plan says what sessions do besides
holding on: drop all at once and come back with their positions (``storm``), stop reading
(``slow``), or come and go (``churn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any, cast

import attrs
import cattrs
import orjson

from odin_fanout.stress.continuity import Continuity, Counts
from odin_fanout.stress.histogram import Latency
from odin_fanout.stress.plan import Plan
from odin_fanout.stress.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    client_frame,
    read_upgrade,
    upgrade_request,
)

_RECONNECT_ATTEMPTS = 5
_HEARTBEAT = client_frame(OP_TEXT, b'{"type":"heartbeat"}')


@attrs.define
class Tally:
    """The worker's counters besides continuity."""

    connects: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    disconnects: int = 0
    messages: int = 0
    bytes: int = 0
    bad_frames: int = 0
    errors: int = 0
    """``error`` replies from the server."""
    slow_closed: int = 0
    """Slow sessions the server cut off (expected: they stopped reading)."""
    unexpected_closes: int = 0
    """Sessions closed by the server that were not slow and not told to reconnect."""
    reconnect_hints: int = 0
    replayed: int = 0
    """Events published before their connection opened: recovered history (not in the
    latency figures)."""


class Session:
    __slots__ = ("channels", "connection", "continuity", "index", "slow", "stopped")

    def __init__(self, index: int, channels: list[str], slow: bool) -> None:
        self.index = index
        self.channels = channels
        self.slow = slow
        self.continuity = Continuity()
        self.connection: Connection | None = None
        self.stopped = False


class Connection(asyncio.Protocol):
    """One WebSocket connection of a session: upgrade, subscribe (recovering), read."""

    def __init__(self, worker: Worker, session: Session, recover: bool) -> None:
        self.worker = worker
        self.session = session
        self.request, self.accept = upgrade_request(worker.plan.host, worker.plan.port,
                                                    worker.plan.path)  # fmt: skip
        self.recover = session.continuity.positions() if recover else {}
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: FrameReader | None = None
        self.started = time.monotonic()
        self.opened_us = int(time.time() * 1e6)
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code = 0
        self.reconnect_after: float | None = None

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's are not subclasses
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"lost: {exc!r}"))
        self.worker.lost(self)

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head, rest, problem = read_upgrade(self.head, data, self.accept)
            if problem:
                self._fail(problem)
                return
            if rest is None:
                return
            data = rest
            self.reader = FrameReader()
            subscribe: dict[str, Any] = {"channels": self.session.channels}
            if self.recover:
                subscribe["recover"] = self.recover
            self._send(OP_TEXT, orjson.dumps({"type": "subscribe", "data": subscribe}))
            if not data:
                return
        tally = self.worker.tally
        for opcode, payload in self.reader.feed(data):
            if opcode in (OP_TEXT, OP_BINARY):
                tally.messages += 1
                tally.bytes += len(payload)
                self._message(payload)
            elif opcode == OP_PING:
                self._send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._send(OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
            elif opcode < 0:
                tally.bad_frames += 1

    # ---- messages ------------------------------------------------------------------------

    def _message(self, payload: bytes) -> None:
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.worker.tally.bad_frames += 1
            return
        continuity = self.session.continuity
        seq = document.get("seq")
        if seq is not None and "prev" in document:
            continuity.on_event(document["channel"], seq, document["prev"], document["epoch"])
            data = document.get("data")
            stamp = data.get("timestamp") if isinstance(data, dict) else None
            if not isinstance(stamp, int):
                stamp = document["ts"]
            if self.session.slow and self.worker.slowing:
                return  # it chose not to read: its delays are not the server's
            if stamp * 1000 < self.opened_us:
                # Published before this connection: history a recovery replays, whose age
                # is the time the client was away, not a delivery latency.
                self.worker.tally.replayed += 1
                return
            self.worker.latency.record_us(int(time.time() * 1e6) - stamp * 1000)
            return
        kind = document.get("type")
        if kind == "subscription_ack":
            continuity.on_ack(document, self.recover or None)
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif kind == "gap":
            continuity.on_gap(document["channel"], document["to"])
        elif kind == "error":
            self.worker.tally.errors += 1
            if not self.subscribed.done():
                self.subscribed.set_exception(ConnectionError(f"error: {document}"))
        elif kind == "reconnect":
            self.worker.tally.reconnect_hints += 1
            self.reconnect_after = float(document.get("after_ms", 0)) / 1000

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def heartbeat(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_HEARTBEAT)

    def _fail(self, why: str) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def drop(self) -> None:
        """Go without a word (a network failure, a killed tab)."""
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Leave properly: a close frame, then the server closes."""
        self._send(OP_CLOSE, (1000).to_bytes(2, "big"))


class Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.tally = Tally()
        self.latency = Latency()
        self.connect_time = Latency()
        self.loop_lag = Latency()
        """How late a 100 ms timer fires: above a few ms, this process limits the run."""
        self.close_codes: Counter[int] = Counter()
        self.failures: Counter[str] = Counter()
        slow = round(len(plan.sessions) * plan.slow_fraction)
        self.sessions = [
            Session(plan.first_index + i, channels, slow=i < slow)
            for i, channels in enumerate(plan.sessions)
        ]
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.slowing = False
        """The slow sessions have stopped reading."""
        self.all_closed = asyncio.Event()
        self.slow_gone = asyncio.Event()
        self._address: tuple[int, Any] | None = None

    @property
    def connected(self) -> int:
        return sum(1 for s in self.sessions if s.connection is not None)

    # ---- connections ---------------------------------------------------------------------

    async def connect(self, session: Session, recover: bool, attempt: int = 1) -> None:
        plan = self.plan
        loop = asyncio.get_running_loop()
        connection = Connection(self, session, recover)
        try:
            async with asyncio.timeout(plan.connect_timeout):
                sock = await self._socket(session.slow)
                await loop.create_connection(lambda: connection, sock=sock)
                await connection.subscribed
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.tally.connect_failures += 1
            self.failures[f"{type(exc).__name__}: {exc}"[:100]] += 1
            connection.drop()
            if recover and attempt < _RECONNECT_ATTEMPTS and not self.stopping:
                # A client coming back tries again, backing off (a first connect does not:
                # the run measures how many get in).
                delay = 0.5 * 2 ** (attempt - 1) * self.rng.uniform(0.5, 1.0)
                self._spawn(self._retry(session, delay, attempt + 1))
            return
        session.connection = connection
        self.tally.connects += 1
        if recover:
            self.tally.reconnects += 1
        self.connect_time.record_us(int((time.monotonic() - connection.started) * 1e6))

    def lost(self, connection: Connection) -> None:
        session = connection.session
        if session.connection is not connection:
            return  # never subscribed, or already replaced
        session.connection = None
        self.tally.disconnects += 1
        code = connection.close_code
        if code:
            self.close_codes[code] += 1
        if session.slow and self.slowing and not self.stopping:
            # A client that stopped reading learns it was cut off (1008, or a reset after
            # the server's close timeout) only when it reads again, at the end of the run.
            self.tally.slow_closed += 1
            session.stopped = True  # and it stays away
        if session.slow and not any(s.slow and s.connection for s in self.sessions):
            self.slow_gone.set()
        if self.stopping or session.stopped:
            if self.stopping and not self.connected:
                self.all_closed.set()
            return
        if connection.reconnect_after is None and code not in (0, 1000):
            self.tally.unexpected_closes += 1
        delay = connection.reconnect_after
        if delay is None:
            delay = self.rng.uniform(0, self.plan.reconnect_delay)
        self._spawn(self._come_back(session, delay))

    async def _socket(self, slow: bool) -> socket.socket:
        """A connected socket. A slow client gets a small receive buffer, as a phone on a
        poor network has, so that not reading shows on the server within seconds rather
        than after the kernel buffered megabytes."""
        loop = asyncio.get_running_loop()
        if self._address is None:
            infos = await loop.getaddrinfo(self.plan.host, self.plan.port,
                                           type=socket.SOCK_STREAM)  # fmt: skip
            self._address = (int(infos[0][0]), infos[0][4])
        family, address = self._address
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if slow:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _retry(self, session: Session, delay: float, attempt: int) -> None:
        await asyncio.sleep(delay)
        if not self.stopping and session.connection is None and not session.stopped:
            await self.connect(session, recover=True, attempt=attempt)

    async def _come_back(self, session: Session, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self.stopping and session.connection is None and not session.stopped:
            await self.connect(session, recover=True)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- the run -------------------------------------------------------------------------

    async def run(self) -> None:
        plan = self.plan
        started = time.monotonic()
        ramp = asyncio.get_running_loop().create_task(self._ramp())
        behaviours = [self._heartbeats(), self._report(), self._watch_lag()]
        if plan.storm_at is not None:
            behaviours.append(self._storm(started + plan.storm_at))
        if plan.slow_fraction:
            behaviours.append(self._slow(started + plan.slow_at))
        if plan.churn_per_s:
            behaviours.append(self._churn())
        for behaviour in behaviours:
            self._spawn(behaviour)
        await asyncio.sleep(max(0.0, started + plan.duration - time.monotonic()))
        ramp.cancel()
        if self.slowing:
            await self._read_slow_again()
        self.stopping = True
        for session in self.sessions:
            if session.connection is not None:
                session.connection.close()
        # Closing handshakes, bounded.
        if self.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await self.all_closed.wait()
        for session in self.sessions:
            if session.connection is not None:
                session.connection.drop()
        for task in list(self.tasks):
            task.cancel()

    async def _ramp(self) -> None:
        """Open every session, ``ramp_per_s`` a second, in batches every 100 ms."""
        batch = max(1, round(self.plan.ramp_per_s / 10))
        for first in range(0, len(self.sessions), batch):
            for session in self.sessions[first : first + batch]:
                self._spawn(self.connect(session, recover=False))
            await asyncio.sleep(0.1)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.plan.heartbeat)
            for session in self.sessions:
                if session.connection is not None and not session.slow:
                    session.connection.heartbeat()

    async def _storm(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        chosen = [s for s in self.sessions if s.connection is not None and not s.slow]
        chosen = chosen[: round(len(chosen) * self.plan.storm_fraction)]
        for session in chosen:
            assert session.connection is not None
            session.connection.drop()  # all at once; each comes back with its positions

    async def _slow(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self.slowing = True
        for session in self.sessions:
            if session.slow and session.connection is not None:
                transport = session.connection.transport
                if transport is not None:
                    transport.pause_reading()

    async def _read_slow_again(self) -> None:
        """A client that does not read never sees the server close it: read again, so that
        what the server did (a close frame, 1008) arrives, bounded to 3 s."""
        slow = [s for s in self.sessions if s.slow and s.connection is not None]
        for session in slow:
            assert session.connection is not None
            if session.connection.transport is not None:
                session.connection.transport.resume_reading()
        if slow:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):  # those still served hold on till then
                    await self.slow_gone.wait()

    async def _churn(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            live = [s for s in self.sessions if s.connection is not None and not s.slow]
            count = min(len(live), round(len(self.sessions) * self.plan.churn_per_s))
            for session in self.rng.sample(live, count):
                assert session.connection is not None
                session.connection.close()

    async def _watch_lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            self.loop_lag.record_us(int((time.monotonic() - before - 0.1) * 1e6))

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            emit(self.snapshot("progress"))

    def snapshot(self, event: str) -> dict[str, Any]:
        counts = Counts()
        for session in self.sessions:
            counts.add(session.continuity.counts)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "event": event,
            "connected": self.connected,
            "sessions": len(self.sessions),
            "tally": attrs.asdict(self.tally),
            "counts": attrs.asdict(counts),
            "latency": self.latency.encode(),
            "connect_time": self.connect_time.encode(),
            "loop_lag": self.loop_lag.encode(),
            "close_codes": {str(code): n for code, n in self.close_codes.items()},
            "failures": dict(self.failures.most_common(10)),
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _exit_when_stdin_closes() -> None:
    """The coordinator went away: so does the worker."""
    sys.stdin.read()
    os._exit(3)


async def _main(plan: Plan) -> None:
    worker = Worker(plan)
    try:
        async with asyncio.timeout(plan.duration + 60):
            await worker.run()
    finally:
        emit(worker.snapshot("result"))


def main() -> None:
    plan = cattrs.structure(json.loads(sys.stdin.readline()), Plan)
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    _raise_fd_limit()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in the stress extra
        runner = asyncio.run
    runner(_main(plan))


if __name__ == "__main__":
    main()

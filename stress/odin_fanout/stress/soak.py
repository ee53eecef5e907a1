"""``odin-stress soak``: hours of steady traffic and churn against one server, sampled for
slow leaks, and the lean client population the leak test (``tests/stress/test_leaks.py``)
drives round by round.

A soak starts ``odin serve --broker memory --simulate --rate R`` on loopback (or loads a
running server: ``--url`` and ``--server-pid``), holds ``--clients`` WebSocket subscribers in
this one process (raw asyncio, uvloop when installed, the frames of
``odin_fanout.stress.wsclient``), a mix of concrete channels and wildcard patterns, lets ``--churn``
of them leave and come back recovering their positions every second, and every ``--interval``
seconds samples:

- the server's RSS, open file descriptors and threads (``/proc/PID``);
- its outbound queues (``odin_connection_queue_depth`` gauge histogram, its ``_gsum``, the
  deepest queue and the oldest queued frame, from ``/metrics``), connections, deliveries;
- the clients' end-to-end latency over the interval (publish timestamp to receipt: p50,
  p90, p99, max) and every stream's continuity (``odin_fanout.stress.continuity``).

It writes the time series and a summary as JSON (rewritten after every sample, so a run cut
short still leaves its figures): least-squares slopes of RSS (MiB/hour), fds and threads
(per hour) over the samples after the warm-up, and latency p50/p99 for each tenth of the
run. Exit 0 when every stream held, 1 when an invariant broke (a silent gap, a duplicate, a
bad recovery), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import attrs
import orjson

from odin_fanout.stress.continuity import Continuity, Counts
from odin_fanout.stress.histogram import Latency
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

MAX_DURATION = 24 * 3600.0
CONCRETE = ("BTC.trade", "ETH.trade", "SOL.trade", "ODIN.trade", "DOGE.trade")
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$",
                     re.MULTILINE)  # fmt: skip


# ---- the client population ----------------------------------------------------------------


def mixed_channels(index: int) -> list[str]:
    """A client's subscription: a quarter take every symbol's trades through ``*.trade``, a
    quarter a pattern and a concrete channel (``BTC.*``, ``ETH.trade``), the rest two concrete
    channels. No client's subscriptions overlap, so each event reaches a client once."""
    kind = index % 4
    if kind == 0:
        return ["*.trade"]
    if kind == 1:
        return ["BTC.*", "ETH.trade"]
    first = index % len(CONCRETE)
    return [CONCRETE[first], CONCRETE[(first + 1 + index // 4 % 4) % len(CONCRETE)]]


class Session:
    """One simulated user: its channels and the continuity of its streams, which survive its
    reconnections; ``connection`` is its open (subscribed) connection, if any."""

    __slots__ = ("channels", "close_code", "connection", "continuity", "events", "index",
                 "slow")  # fmt: skip

    def __init__(self, index: int, channels: list[str], *, slow: bool = False) -> None:
        self.index = index
        self.channels = channels
        self.slow = slow
        """Stops reading once subscribed (``Population.open`` pauses it)."""
        self.continuity = Continuity()
        self.connection: Connection | None = None
        self.events = 0
        """Events received over all its connections."""
        self.close_code = 0
        """The close code of its last connection (0: none came: reset or aborted)."""


class Connection(asyncio.Protocol):
    """One WebSocket connection of a session: upgrade, subscribe (recovering), read."""

    def __init__(self, population: Population, session: Session, recover: bool) -> None:
        self.population = population
        self.session = session
        self.request, self.accept = upgrade_request(population.host, population.port,
                                                    population.path)  # fmt: skip
        self.recover = session.continuity.positions() if recover else {}
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: FrameReader | None = None
        self.opened_us = int(time.time() * 1e6)
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's are not subclasses
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"lost: {exc!r}"))
            self.subscribed.exception()  # retrieved: nobody may be waiting any more
        if not self.lost.done():
            self.lost.set_result(None)
        self.population.on_lost(self)

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head, rest, problem = read_upgrade(self.head, data, self.accept)
            if problem:
                self.fail(problem)
                return
            if rest is None:
                return
            data = rest
            self.reader = FrameReader()
            subscribe: dict[str, Any] = {"channels": self.session.channels}
            if self.recover:
                subscribe["recover"] = self.recover
            self.send(OP_TEXT, orjson.dumps({"type": "subscribe", "data": subscribe}))
            if not data:
                return
        population = self.population
        for opcode, payload in self.reader.feed(data):
            if opcode in (OP_TEXT, OP_BINARY):
                population.frames += 1
                self.message(payload)
            elif opcode == OP_PING:
                self.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send(OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
            elif opcode < 0:
                population.bad_frames += 1

    def message(self, payload: bytes) -> None:
        population = self.population
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            population.bad_frames += 1
            return
        session = self.session
        seq = document.get("seq")
        if seq is not None and "prev" in document:
            session.continuity.on_event(document["channel"], seq, document["prev"],
                                        document["epoch"])  # fmt: skip
            session.events += 1
            data = document.get("data")
            stamp = data.get("timestamp") if isinstance(data, dict) else None
            if not isinstance(stamp, int):
                stamp = document["ts"]
            if session.slow:
                return  # it chose not to read: its delays are not the server's
            if stamp * 1000 < self.opened_us:
                population.replayed += 1  # history a recovery replays: not a delivery latency
            else:
                population.latency.record_us(int(time.time() * 1e6) - stamp * 1000)
            return
        kind = document.get("type")
        if kind == "subscription_ack":
            session.continuity.on_ack(document, self.recover or None)
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif kind == "gap":
            session.continuity.on_gap(document["channel"], document["to"])
        elif kind == "error":
            population.errors[str(document.get("data", document))[:120]] += 1
            if not self.subscribed.done():
                self.subscribed.set_exception(ConnectionError(f"error: {document}"))

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def fail(self, why: str) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Population:
    """WebSocket subscribers in this process, opened, paused, closed and dropped in groups."""

    def __init__(self, host: str, port: int, path: str = "/ws") -> None:
        self.host = host
        self.port = port
        self.path = path
        self.latency = Latency()
        """Delivery latencies since the last ``take_latency``."""
        self.frames = 0
        self.replayed = 0
        self.bad_frames = 0
        self.connects = 0
        self.connect_failures: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[int] = Counter()
        self.unexpected_closes = 0
        """Connections lost that this side did not end (``close``/``drop``) and that were not
        slow: the server closed them, or reset them."""
        self._ending: set[Connection] = set()
        self._address: tuple[int, Any] | None = None
        self.live: set[Connection] = set()
        """Every connection whose socket is open (subscribed or not yet)."""

    def take_latency(self) -> Latency:
        latency, self.latency = self.latency, Latency()
        return latency

    def counts(self, sessions: Sequence[Session]) -> Counts:
        total = Counts()
        for session in sessions:
            total.add(session.continuity.counts)
        return total

    def on_lost(self, connection: Connection) -> None:
        self.live.discard(connection)
        session = connection.session
        code = connection.close_code
        self.close_codes[code] += 1
        session.close_code = code
        if session.connection is connection:
            session.connection = None
            if connection not in self._ending and not session.slow:
                self.unexpected_closes += 1
        self._ending.discard(connection)

    async def _socket(self, slow: bool) -> socket.socket:
        """A connected socket; a slow client's receive buffer is small (a phone on a poor
        network), so that its not reading shows on the server within a few frames."""
        loop = asyncio.get_running_loop()
        if self._address is None:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
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

    async def connect(self, session: Session, *, recover: bool, within: float = 15.0) -> bool:
        """Open, upgrade and subscribe one session (recovering its positions); a slow one
        stops reading once subscribed. False (and the cause counted) when it failed."""
        loop = asyncio.get_running_loop()
        connection = Connection(self, session, recover)
        try:
            async with asyncio.timeout(within):
                sock = await self._socket(session.slow)
                await loop.create_connection(lambda: connection, sock=sock)
                self.live.add(connection)
                await connection.subscribed
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.connect_failures[f"{type(exc).__name__}: {exc}"[:100]] += 1
            self._ending.add(connection)
            connection.abort()
            return False
        session.connection = connection
        self.connects += 1
        if session.slow and connection.transport is not None:
            connection.transport.pause_reading()
        return True

    async def open(
        self, sessions: Sequence[Session], *, recover: bool = False, concurrency: int = 100,
        within: float = 15.0,
    ) -> int:  # fmt: skip
        """Connect these sessions, ``concurrency`` at a time; how many failed."""
        gate = asyncio.Semaphore(concurrency)

        async def one(session: Session) -> bool:
            async with gate:
                return await self.connect(session, recover=recover, within=within)

        results = await asyncio.gather(*(one(s) for s in sessions))
        return results.count(False)

    def resume(self, sessions: Sequence[Session]) -> None:
        """Slow sessions read again (and so see what the server did to them)."""
        wanted = {id(s) for s in sessions}
        for connection in list(self.live):
            if id(connection.session) in wanted and connection.transport is not None:
                with contextlib.suppress(RuntimeError):
                    connection.transport.resume_reading()

    async def close(self, sessions: Sequence[Session], within: float = 10.0) -> int:
        """Leave properly (a close frame, then the server closes); those not gone within
        ``within`` seconds are aborted. How many had to be aborted."""
        wanted = {id(s) for s in sessions}
        ending = [c for c in self.live if id(c.session) in wanted]
        for connection in ending:
            self._ending.add(connection)
            connection.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        return await self._await_lost(ending, within)

    async def drop(self, sessions: Sequence[Session], within: float = 5.0) -> int:
        """Go without a word (a network failure): every socket reset at once."""
        wanted = {id(s) for s in sessions}
        ending = [c for c in self.live if id(c.session) in wanted]
        for connection in ending:
            self._ending.add(connection)
            connection.abort()
        return await self._await_lost(ending, within)

    async def _await_lost(self, connections: list[Connection], within: float) -> int:
        pending = [c.lost for c in connections if not c.lost.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await asyncio.gather(*pending)
        stuck = [c for c in connections if not c.lost.done()]
        for connection in stuck:
            connection.abort()
        if stuck:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*(c.lost for c in stuck))
        return len(stuck)


async def wait_until(
    condition: Callable[[], bool], within: float, what: str, poll: float = 0.05
) -> float:
    """Wait (bounded) until ``condition()`` holds; the seconds it took. TimeoutError says
    what did not happen."""
    started = time.monotonic()
    deadline = started + within
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {within:g} s")
        await asyncio.sleep(poll)
    return time.monotonic() - started


# ---- the server, from outside ---------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, int | None]:
    """The process's resident memory (bytes), open descriptors and threads, from /proc."""
    sample: dict[str, int | None] = {"rss_bytes": None, "fds": None, "threads": None}
    with contextlib.suppress(OSError, ValueError):
        status = Path(f"/proc/{pid}/status").read_text()
        rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        threads = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
        sample["rss_bytes"] = int(rss.group(1)) * 1024 if rss else None
        sample["threads"] = int(threads.group(1)) if threads else None
        sample["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return sample


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def read_metrics(url: str) -> dict[str, float]:
    """The figures a soak follows from the server's /metrics ({} when it cannot be read):
    queue depths by bucket (``queue_le_<N>``: connections with at most N frames queued),
    frames queued in all, the deepest queue, the oldest frame, connections, deliveries."""
    try:
        text = http_get(url).decode()
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    wanted = {
        "odin_connection_queue_depth_gsum": "queued_frames",
        "odin_connection_queue_depth_max": "queue_depth_max",
        "odin_connection_queue_age_max_seconds": "queue_age_max_s",
        "odin_connections_active": "connections",
        "odin_deliveries_total": "deliveries_total",
        "process_open_fds": "open_fds",
        "process_resident_memory_bytes": "rss_bytes",
    }
    figures: dict[str, float] = {}
    for name, labels, value in _METRIC.findall(text):
        if name in wanted:
            figures[wanted[name]] = float(value)
        elif name == "odin_connection_queue_depth_bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                figures[f"queue_le_{le.group(1)}"] = float(value)
        elif name == "odin_slow_consumers_total" and 'action="closed"' in labels:
            figures["slow_closed_total"] = float(value)
    return figures


class ServerProcess:
    """``odin serve`` started here: its port from its ``listening`` log line, its stderr read
    in a thread (the last lines kept, warnings and errors counted), stopped by its PID."""

    def __init__(self, args: Sequence[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "odin_fanout", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "ODIN_SERVER_WORKERS": "1"},
        )
        self.tail: deque[str] = deque(maxlen=50)
        self.levels: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.port: int | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            level = str(record.get("level", "")).lower()
            self.levels[level] += 1
            if level in ("warning", "error", "critical"):
                self.events[str(record.get("event"))] += 1
            if record.get("event") == "listening" and self.port is None:
                url = str(record["websocket"][0])
                self.port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
                self._listening.set()
        self._listening.set()

    def wait_listening(self, timeout: float = 30.0) -> int:
        self._listening.wait(timeout)
        if self.port is None:
            self.stop()
            raise RuntimeError("odin serve did not start: " + " | ".join(self.tail))
        return self.port

    def stop(self) -> int | None:
        process = self.process
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            if process.poll() is not None:
                break
            process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=wait)
        return process.poll()


# ---- the soak ------------------------------------------------------------------------------


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) in value per hour (None for < 3 points)."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600


def summarize(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    """Slopes after the warm-up, and latency for each tenth of the run."""
    steady = [s for s in samples if s["t"] >= warmup] or samples

    def series(key: str, scale: float = 1.0) -> list[tuple[float, float]]:
        return [(s["t"], s[key] / scale) for s in steady if s.get(key) is not None]

    def first_last(key: str, scale: float = 1.0) -> dict[str, float | None]:
        values = series(key, scale)
        return {
            "first": round(values[0][1], 2) if values else None,
            "last": round(values[-1][1], 2) if values else None,
            "min": round(min(v for _, v in values), 2) if values else None,
            "max": round(max(v for _, v in values), 2) if values else None,
        }

    def rounded(value: float | None, digits: int = 3) -> float | None:
        return None if value is None else round(value, digits)

    tenths: list[dict[str, Any]] = []
    if samples:
        span = samples[-1]["t"] or 1.0
        for part in range(10):
            low, high = span * part / 10, span * (part + 1) / 10
            chosen = [s for s in samples if low < s["t"] <= high and s["latency_ms"]["p50"]]
            if not chosen:
                continue
            tenths.append({
                "from_s": round(low), "to_s": round(high),
                "p50_ms": max(s["latency_ms"]["p50"] for s in chosen),
                "p99_ms": max(s["latency_ms"]["p99"] for s in chosen),
                "max_ms": max(s["latency_ms"]["max"] for s in chosen),
            })  # fmt: skip
    return {
        "warmup_s": warmup,
        "samples": len(samples),
        "steady_samples": len(steady),
        "rss_mib_per_hour": rounded(slope_per_hour(series("rss_bytes", 2**20))),
        "fds_per_hour": rounded(slope_per_hour(series("fds"))),
        "fds_less_connections_per_hour": rounded(slope_per_hour(series("fds_less_connections"))),
        "threads_per_hour": rounded(slope_per_hour(series("threads"))),
        "connections_per_hour": rounded(slope_per_hour(series("connections"))),
        "rss_mib": first_last("rss_bytes", 2**20),
        "fds": first_last("fds"),
        "fds_less_connections": first_last("fds_less_connections"),
        "threads": first_last("threads"),
        "queued_frames_max": max((s.get("queued_frames") or 0 for s in samples), default=None),
        "queue_depth_max": max((s.get("queue_depth_max") or 0 for s in samples), default=None),
        "latency_by_tenth": tenths,
    }


async def soak(options: argparse.Namespace, pid: int | None, port: int, host: str,
               path: str) -> dict[str, Any]:  # fmt: skip
    """Hold the population for the duration with churn, sampling every interval."""
    population = Population(host, port, path)
    rng = random.Random(options.seed)
    sessions = [Session(i, mixed_channels(i)) for i in range(options.clients)]
    metrics_url = f"http://{host}:{port}/metrics"
    started = time.monotonic()
    samples: list[dict[str, Any]] = []
    options_used = {k: v for k, v in vars(options).items() if isinstance(v, int | float | str)}
    document: dict[str, Any] = {"options": options_used}
    tasks: set[asyncio.Task[Any]] = set()
    whole = Latency()
    churned = 0
    stopping = False

    async def come_back(session: Session, delay: float) -> None:
        await asyncio.sleep(delay)
        if not stopping and session.connection is None:
            await population.connect(session, recover=True)

    def spawn(coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def churn() -> None:
        nonlocal churned
        owed = 0.0
        while True:
            await asyncio.sleep(1.0)
            owed += len(sessions) * options.churn
            live = [s for s in sessions if s.connection is not None]
            count = min(len(live), int(owed))
            owed -= count
            chosen = rng.sample(live, count)
            churned += count
            if chosen:
                spawn(population.close(chosen))
                for session in chosen:
                    spawn(come_back(session, rng.uniform(0.5, 2.0)))

    # Those that never got in are retried as clients would, recovering if they had been in.
    async def keep_up() -> None:
        while True:
            await asyncio.sleep(5.0)
            away = [s for s in sessions if s.connection is None]
            if away and not stopping and len(away) > len(sessions) * options.churn * 3:
                await population.open(away, recover=True)

    failed = await population.open(sessions, concurrency=50)
    document["connect"] = {"clients": len(sessions), "failed": failed,
                           "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    population.take_latency()
    spawn(churn())
    spawn(keep_up())
    next_at = started + options.interval
    end = started + options.duration
    last_frames = population.frames
    last_time = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            await asyncio.sleep(max(0.0, min(next_at, end) - now))
            now = time.monotonic()
            latency = population.take_latency()
            whole.add(latency)
            counts = population.counts(sessions)
            sample: dict[str, Any] = {
                "t": round(now - started, 1),
                **(proc_sample(pid) if pid is not None else {}),
                **read_metrics(metrics_url),
                "clients_connected": sum(1 for s in sessions if s.connection is not None),
                "frames_per_s": round((population.frames - last_frames) / (now - last_time), 1),
                "latency_ms": latency.summary_ms(),
                "latency_samples": latency.count,
                "events": counts.events,
                "violations": counts.violations,
                # Which invariant broke, when one did: the sample says when, these say what.
                "silent_gaps": counts.silent_gaps,
                "duplicates": counts.duplicates,
                "out_of_order": counts.out_of_order,
                "bad_recoveries": counts.bad_recoveries,
                "recoveries": counts.recoveries,
                "recovered": counts.recovered,
                "not_recovered": counts.not_recovered,
                "announced_gaps": counts.announced_gaps,
                "churned": churned,
                "client_cpu_s": round(_cpu_seconds(), 1),
            }
            if pid is None and "rss_bytes" in sample:
                sample["fds"] = sample.get("open_fds")
            if sample.get("fds") is not None and sample.get("connections") is not None:
                # What churn does not explain: descriptors beyond one per open connection.
                sample["fds_less_connections"] = sample["fds"] - sample["connections"]
            last_frames, last_time = population.frames, now
            samples.append(sample)
            if options.print:
                lat = sample["latency_ms"]
                print(f"{sample['t']:8.0f}s  rss {(sample.get('rss_bytes') or 0) / 2**20:7.1f} "
                      f"MiB  fds {sample.get('fds')}  conns {sample.get('connections')}  "
                      f"queued {sample.get('queued_frames')}  {sample['frames_per_s']:8.0f} "
                      f"frames/s  p50 {lat['p50']} p99 {lat['p99']} ms  violations "
                      f"{sample['violations']}", flush=True)  # fmt: skip
            document.update(samples=samples)
            if options.json is not None:
                options.json.write_text(json.dumps(document, indent=1))
            if now >= end:
                break
            next_at += options.interval
    finally:
        stopping = True
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await population.close(sessions, within=10)
    counts = population.counts(sessions)
    warmup = min(options.warmup, options.duration / 4)
    document["summary"] = {
        **summarize(samples, warmup),
        "latency_ms": whole.summary_ms(),
        "frames": population.frames,
        "replayed": population.replayed,
        "continuity": {**attrs.asdict(counts), "violations": counts.violations},
        "connects": population.connects,
        "connect_failures": dict(population.connect_failures.most_common(10)),
        "errors": dict(population.errors.most_common(10)),
        "close_codes": {str(k): v for k, v in population.close_codes.items()},
        "unexpected_closes": population.unexpected_closes,
        "bad_frames": population.bad_frames,
        "churned": churned,
    }
    return document


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``20m``, ``2h`` or ``1.5h``: seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"a duration like 90s, 20m or 2h, got {text!r}")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=3600.0,
        help="how long: 90s, 20m, 2h (default 1h; at most 24h)",
    )
    parser.add_argument(
        "--interval", type=parse_duration, default=10.0, help="seconds between samples (default 10)"
    )
    parser.add_argument(
        "--clients", type=int, default=1000, help="WebSocket subscribers held (default 1000)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="events/s the server's simulator publishes over 5 channels "
        "(default 20; for a server started here)",
    )
    parser.add_argument(
        "--churn",
        type=float,
        default=0.005,
        help="fraction of clients leaving each second, back within 0.5-2 s "
        "recovering their positions (default 0.005)",
    )
    parser.add_argument(
        "--warmup",
        type=parse_duration,
        default=300.0,
        help="seconds left out of the slopes, at most a quarter of the run (default 300: the "
        "server's history window fills for history.max_age, 300 s by default)",
    )
    parser.add_argument(
        "--url",
        help="soak a running server (ws://host:port/ws) instead of "
        "starting one; give --server-pid for its RSS, fds and threads",
    )
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--allow-remote", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the series and the summary here")
    parser.add_argument("--quiet", dest="print", action="store_false",
                        help="no line per sample")  # fmt: skip


def run_soak(options: argparse.Namespace) -> int:
    if options.duration > MAX_DURATION or options.clients <= 0 or options.interval <= 0:
        sys.stderr.write("odin-stress soak: --duration at most 24h; --clients, --interval > 0\n")
        return 2
    if not 0 <= options.churn <= 1:
        sys.stderr.write("odin-stress soak: --churn is a fraction between 0 and 1\n")
        return 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server: ServerProcess | None = None
    if options.url:
        url = urlsplit(options.url)
        if url.scheme != "ws" or not url.hostname or not url.port:
            sys.stderr.write("odin-stress soak: --url must be ws://host:port/path\n")
            return 2
        from odin_fanout.stress.cli import is_loopback

        if not options.allow_remote and not is_loopback(url.hostname):
            sys.stderr.write(f"odin-stress soak: {url.hostname} is not loopback "
                             "(--allow-remote)\n")  # fmt: skip
            return 2
        host, port, path, pid = url.hostname, url.port, url.path or "/", options.server_pid
    else:
        server = ServerProcess([
            "--broker", "memory", "--simulate", "--rate", f"{options.rate:g}", "--port", "0",
            "--host", "127.0.0.1", "--log-format", "json",
            "--set", f"server.max_connections={options.clients + 1000}",
        ])  # fmt: skip
        host, port, path, pid = "127.0.0.1", server.wait_listening(), "/ws", server.pid
    try:
        runner: Callable[[Any], Any] = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
        document = runner(soak(options, pid, port, host, path))
    finally:
        exit_code = server.stop() if server is not None else None
    if server is not None:
        document["server"] = {
            "args": server.process.args[3:] if isinstance(server.process.args, list) else None,
            "exit_code": exit_code,
            "log_levels": dict(server.levels),
            "warnings_by_event": dict(server.events),
        }
    document["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if options.json is not None:
        options.json.write_text(json.dumps(document, indent=1))
    summary = document["summary"]
    print(json.dumps({k: v for k, v in summary.items() if k != "latency_by_tenth"}, indent=1))
    return 1 if summary["continuity"]["violations"] or summary["bad_frames"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odin-stress soak", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_soak(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

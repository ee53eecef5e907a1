"""``odin-stress chaos``: one run where everything goes wrong at once.

It starts, on loopback, in a directory of its own:

* a nats-server with JetStream and a file store (restartable on the same port and store);
* a partition proxy between Odin and NATS (``odin_fanout.stress.proxy``);
* ``odin serve --workers N`` reading NATS through the proxy, with a config file (for SIGHUP);
* ``odin-publisher`` publishing at ``--rate`` events/s straight to NATS;
* ``--clients`` continuity-checking WebSocket clients in this process (Trio, the RFC 6455
  client side of ``odin_fanout.stress.wsclient``, one ``odin_fanout.stress.continuity.Continuity``
  per client, which survives reconnects: a client that comes back subscribes with ``recover`` and
  its positions, and follows a ``reconnect`` hint's delay).

Then, in cycles (one per ``--cycle`` seconds of the run, at least one), every fault at once:
their start times are drawn from ``--seed`` around one anchor per cycle so that they overlap.

* ``nats_kill``: nats-server SIGKILLed, restarted 2 s later on the same port and store;
* ``partition``: the proxy holds every byte for 3 s (``blackhole``: a silent partition, the
  connections stay open), then resets every connection and refuses new ones for 2 s
  (``reset``: a noisy one), then heals;
* ``storm``: half the reading clients dropped at once (RST), all coming back recovering;
* ``slow``: extra clients (a 4 KiB receive buffer) stop reading; the server's slow-consumer
  policy must deal with them and nobody else may suffer; they read again at the cycle's end
  for 3 s (to see what the server did), then leave;
* ``churn``: for 6 s, each second 10 % of the reading clients leave (close 1000); half come
  back recovering, the other half are replaced by new clients;
* ``sighup``: the config file changes and the supervisor gets SIGHUP (``config_reloaded``
  from every worker);
* ``worker_kill``: one worker SIGKILLed (the supervisor restarts it; its clients recover);

and at the end: the publisher stops, every reading client must reach the stream's last
position on each of its channels (so that a loss at the tail is not missed: a gap shows
only when a later event arrives), the publisher starts again, and ``sigterm`` drains Odin
under load (clients told to reconnect, exit code 0).

Per client it reports what was lost silently (``silent_gaps``, and ``tail_missing``),
announced (``gap`` notices, ``recovered: false``), duplicated and reordered; per fault the
time until every reading client had an event published after the fault ended (``recovery``);
and a verdict: no silent loss, no duplicate, no reordering and no bad recovery answer for the
clients that read; nothing duplicated or reordered for the slow ones either; every fault
happened (from this run's event log and Odin's); every fault recovered within 60 s; Odin
exited 0 after SIGTERM; no error or traceback in Odin's log.

Exit code 0 when the verdict holds, 1 when it does not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from odin_fanout.stress.continuity import Continuity
from odin_fanout.stress.histogram import Latency
from odin_fanout.stress.proxy import PartitionProxy
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

TOKENS = ("BTC", "ETH", "SOL")
CHANNELS = tuple(f"{token}.trade" for token in TOKENS)
FAULTS = ("nats_kill", "partition", "storm", "slow", "churn", "sighup", "worker_kill")
WARMUP = 6.0
"""Seconds of calm before the first cycle (every client connected, the stream flowing)."""
SETTLE = 12.0
"""Seconds of calm after the last cycle, before the tail check."""
RECOVERY_BOUND = 60.0
NATS_DOWN = 2.0
PARTITION_HOLD = 3.0
PARTITION_DROP = 2.0
CHURN_SECONDS = 6
SLOW_READ_AGAIN = 3.0
DRAIN_TIMEOUT = 5.0
QUEUE_MAX_MESSAGES = 256
"""Odin's per-connection queue (default 1024), lowered so that a client that stops reading
is cut off within a cycle; still above the catch-up burst each reading client gets when NATS
comes back (rate × outage × its share of the channels): 64 was not, and cut most readers."""
MAX_CLIENTS = 2000
MAX_DURATION = 4 * 3600.0
_HEARTBEAT = client_frame(OP_TEXT, b'{"type":"heartbeat"}')
_LINGER_RST = struct.pack("ii", 1, 0)


def wall_ms() -> int:
    return int(time.time() * 1000)


# ---- the processes -----------------------------------------------------------------------


def _clean_env(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ODIN_", "NATS_"))}
    env.update(XDG_STATE_HOME=str(directory), XDG_RUNTIME_DIR=str(directory))
    return env


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM by PID, then SIGKILL; the exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


class Nats:
    """nats-server, JetStream, file store; restartable on the same port and store."""

    def __init__(self, directory: Path) -> None:
        from odin_fanout.broker.embedded import find_binary

        self.binary = find_binary("")
        self.store = directory / "nats-store"
        self.log = directory / "nats.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> int:
        assert self.process is None
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port or -1),
                 "-sd", str(self.store)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if "Server is ready" in text:
                for line in text.splitlines():
                    if "Listening for client connections on" in line:
                        self.port = int(line.rsplit(":", 1)[1])
                return self.process.pid
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        _stop(self.process)
        self.process = None
        raise RuntimeError(f"nats-server did not start: {self.log.read_text()[-1500:]}")

    def kill(self) -> int:
        assert self.process is not None
        pid = self.process.pid
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None
        return pid

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


class OdinLog:
    """Odin's JSON log lines (stderr to a file), read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[tuple[float, dict[str, Any]]] = []
        self._offset = 0
        self._partial = b""
        self.pids: dict[int, int] = {}
        """Worker slot → pid, as the log tells."""

    def poll(self) -> None:
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        now = trio.current_time()
        for line in lines:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                record = {"event": "_not_json", "line": line.decode(errors="replace")[:500]}
            self.records.append((now, record))
            if record.get("event") == "workers_ready":
                self.pids.update(enumerate(int(p) for p in record.get("pids", [])))
            elif record.get("event") == "worker_started":
                self.pids[int(record["worker"])] = int(record["pid"])

    def find(self, event: str, after: float = 0.0, **fields: Any) -> list[dict[str, Any]]:
        return [
            record
            for at, record in self.records
            if at >= after
            and record.get("event") == event
            and all(record.get(k) == v for k, v in fields.items())
        ]

    async def wait_for(self, event: str, after: float = 0.0) -> dict[str, Any]:
        """The first record of ``event`` (the caller bounds the wait)."""
        while True:
            self.poll()
            found = self.find(event, after)
            if found:
                return found[0]
            await trio.sleep(0.1)


# ---- the clients ---------------------------------------------------------------------------


@attrs.define(eq=False)
class Watch:
    """Time to recover after one fault: when each reading client first had an event
    published after the fault ended."""

    fault: str
    cycle: int
    end_mono: float
    threshold_ms: int
    eligible: set[int]
    done: dict[int, float] = attrs.Factory(dict)


class Client:
    def __init__(self, chaos: Chaos, index: int, channels: list[str], kind: str) -> None:
        self.chaos = chaos
        self.index = index
        self.channels = channels
        self.kind = kind  # "reader" or "slow"
        self.continuity = Continuity()
        self.stream: trio.SocketStream | None = None
        self.scope: trio.CancelScope | None = None
        self.send_lock = trio.Lock()
        self.ended = trio.Event()
        """Set when a connection ends (then replaced)."""
        self.subscribed = False
        self.gone = False
        self.paused = False
        self.resumed = trio.Event()
        self.hint_after: float | None = None
        self.leaving = False
        self.connects = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.closes: Counter[str] = Counter()
        self.bad_frames = 0
        self.errors = 0
        self.reconnect_hints = 0
        self.tail_missing = 0
        self.cut_by_server = False
        self.last_ts_ms = 0
        self.watches: list[Watch] = []
        self.joined = trio.current_time()
        self.left: float | None = None
        self.why_left = ""

    # ---- control from the scheduler ----

    def drop(self) -> None:
        """Go without a word (RST): a storm."""
        stream = self.stream
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        if self.scope is not None:
            self.scope.cancel()

    async def leave(self, *, for_good: bool, why: str) -> None:
        """Leave properly: a close frame, then the server closes (bounded)."""
        if for_good:
            self.gone = True
            self.why_left = why
        self.leaving = True
        with (
            trio.move_on_after(2),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await self._send(OP_CLOSE, (1000).to_bytes(2, "big"))
        with trio.move_on_after(2):
            await self.ended.wait()
        if self.scope is not None and self.subscribed:
            self.scope.cancel()

    def stop_reading(self) -> None:
        self.paused = True

    def read_again(self) -> None:
        self.paused = False
        self.resumed.set()

    # ---- the session ----

    def _over(self) -> bool:
        return self.gone or self.chaos.stopping

    async def run(self) -> None:
        failures = 0
        while not self._over():
            ok = await self._connect_once()
            if self._over():
                break
            if self.kind == "slow" and self.paused:
                self.gone, self.why_left = True, "closed while not reading"
                break
            if ok:
                failures = 0
                delay = self.hint_after
                if delay is None:
                    delay = self.chaos.rng.uniform(0.05, 0.5)
                    if self.leaving:  # churn: away for a while
                        delay = self.chaos.rng.uniform(0.2, 1.5)
            else:
                failures += 1
                delay = min(5.0, 0.2 * 2 ** min(failures, 5)) * self.chaos.rng.uniform(0.5, 1.0)
            self.hint_after = None
            self.leaving = False
            await trio.sleep(delay)
        self.left = trio.current_time()

    async def _send(self, opcode: int, payload: bytes) -> None:
        stream = self.stream
        if stream is not None:
            async with self.send_lock:
                await stream.send_all(client_frame(opcode, payload))

    async def heartbeat(self) -> None:
        if self.subscribed and not self.paused:
            with (
                trio.move_on_after(1),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                async with self.send_lock:
                    if self.stream is not None:
                        await self.stream.send_all(_HEARTBEAT)

    async def _connect_once(self) -> bool:
        """One connection, to its end. True if it subscribed."""
        chaos = self.chaos
        recover = self.continuity.positions() if self.connects else {}
        ok = False
        code = ""
        with trio.CancelScope() as scope:
            self.scope = scope
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if self.kind == "slow":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                with trio.fail_after(10):
                    await sock.connect(("127.0.0.1", chaos.port))
                    self.stream = trio.SocketStream(sock)
                    request, accept = upgrade_request("127.0.0.1", chaos.port, "/ws")
                    await self.stream.send_all(request)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        data = await self.stream.receive_some(65536)
                        if not data or len(head) > MAX_HEAD:
                            raise ConnectionError("handshake: closed or too large")
                        head += data
                    end = head.index(b"\r\n\r\n")
                    problem = check_upgrade(head[:end], accept)
                    if problem:
                        raise ConnectionError(problem)
                    rest = head[end + 4 :]
                    subscribe: dict[str, Any] = {"channels": self.channels}
                    if recover:
                        subscribe["recover"] = recover
                    await self._send(
                        OP_TEXT, orjson.dumps({"type": "subscribe", "data": subscribe})
                    )
                reader = FrameReader()
                opened_ms = wall_ms()
                code = await self._read(reader, rest, recover, opened_ms)
                ok = True
            except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError,
                    trio.ClosedResourceError) as exc:  # fmt: skip
                code = "reset" if self.subscribed else ""
                if not self.subscribed:
                    self.connect_failures += 1
                    chaos.failures[f"{type(exc).__name__}: {exc}"[:80]] += 1
            finally:
                ok = ok or self.subscribed
                self.subscribed = False
                self.ended.set()
                self.ended = trio.Event()
                with trio.CancelScope(shield=True):
                    if self.stream is not None:
                        await trio.aclose_forcefully(self.stream)
                    else:
                        sock.close()
                self.stream = None
        self.scope = None
        if scope.cancelled_caught and not code:
            code = "dropped" if not self.leaving else "left"
        if ok:
            self.closes[code or "eof"] += 1
        return ok

    async def _read(
        self, reader: FrameReader, data: bytes, recover: dict[str, Any], opened_ms: int
    ) -> str:
        assert self.stream is not None
        while True:
            for opcode, payload in reader.feed(data) if data else ():
                if opcode in (OP_TEXT, OP_BINARY):
                    self._message(payload, recover, opened_ms)
                elif opcode == OP_PING:
                    await self._send(OP_PONG, payload)
                elif opcode == OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    if code == 1008 and self.kind == "slow":
                        self.cut_by_server = True
                        self.gone, self.why_left = True, "cut off by the server (1008)"
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._send(OP_CLOSE, payload[:2])
                    return str(code)
                elif opcode < 0:
                    self.bad_frames += 1
            if self.paused:
                await self.resumed.wait()
            data = await self.stream.receive_some(65536)
            if not data:
                return "eof"

    def _message(self, payload: bytes, recover: dict[str, Any], opened_ms: int) -> None:
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.bad_frames += 1
            return
        continuity = self.continuity
        seq = document.get("seq")
        if seq is not None and "prev" in document:
            continuity.on_event(document["channel"], seq, document["prev"], document["epoch"])
            data = document.get("data")
            stamp = data.get("timestamp") if isinstance(data, dict) else None
            if not isinstance(stamp, int):
                stamp = int(document["ts"])
            if stamp > self.last_ts_ms:
                self.last_ts_ms = stamp
            if self.watches:
                now = trio.current_time()
                for watch in self.watches:
                    if stamp >= watch.threshold_ms:
                        watch.done[self.index] = max(0.0, now - watch.end_mono)
                self.watches = [w for w in self.watches if self.index not in w.done]
            if stamp >= opened_ms and not self.paused:
                self.chaos.latency.record_us((wall_ms() - stamp) * 1000)
            return
        kind = document.get("type")
        if kind == "subscription_ack":
            continuity.on_ack(document, recover or None)
            if not self.subscribed:
                self.subscribed = True
                self.connects += 1
                self.reconnects += self.connects > 1
        elif kind == "gap":
            continuity.on_gap(document["channel"], document["to"])
        elif kind == "error":
            self.errors += 1
        elif kind == "reconnect":
            self.reconnect_hints += 1
            self.hint_after = float(document.get("after_ms", 0)) / 1000

    def report(self) -> dict[str, Any]:
        counts = self.continuity.counts
        return {
            "client": self.index,
            "kind": self.kind,
            "channels": self.channels,
            "events": counts.events,
            "lost_silently": counts.silent_gaps + self.tail_missing,
            "silent_gaps": counts.silent_gaps,
            "tail_missing": self.tail_missing,
            "announced_gaps": counts.announced_gaps,
            "not_recovered": counts.not_recovered,
            "recovered": counts.recovered,
            "duplicates": counts.duplicates,
            "reordered": counts.out_of_order,
            "bad_recoveries": counts.bad_recoveries,
            "epoch_changes": counts.epoch_changes,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "closes": dict(self.closes),
            "reconnect_hints": self.reconnect_hints,
            "bad_frames": self.bad_frames,
            "errors": self.errors,
            "cut_by_server": self.cut_by_server,
            "closed_1008": self.closes.get("1008", 0),
            "left": self.why_left or None,
        }


# ---- the run -------------------------------------------------------------------------------


@attrs.frozen
class Options:
    duration: float = 120.0
    clients: int = 100
    rate: float = 50.0
    seed: int = 1
    workers: int = 2
    cycle: float = 40.0
    slow: int = 0
    """Slow clients per cycle (0: a tenth of ``clients``, at least 2)."""


class Chaos:
    def __init__(self, options: Options, directory: Path) -> None:
        self.options = options
        self.directory = directory
        self.rng = random.Random(options.seed)
        self.started = 0.0
        self.events: list[dict[str, Any]] = []
        self.clients: list[Client] = []
        self.watches: list[Watch] = []
        self.latency = Latency()
        self.failures: Counter[str] = Counter()
        self.stopping = False
        self.port = 0
        self.nats = Nats(directory)
        self.proxy: PartitionProxy | None = None
        self.odin: subprocess.Popen[bytes] | None = None
        self.odin_log = OdinLog(directory / "odin.log")
        self.publisher: subprocess.Popen[bytes] | None = None
        self.config_path = directory / "odin.toml"
        self.reload_count = 0
        self.health: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}
        self._nursery: trio.Nursery | None = None
        self._next_index = 0

    # ---- the log ----

    def log(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"t": round(trio.current_time() - self.started, 3), "event": event, **fields}
        self.events.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
        return record

    # ---- processes ----

    def _write_config(self, max_subscriptions: int) -> None:
        self.config_path.write_text(
            "[log]\nformat = \"json\"\nlevel = \"info\"\n"
            f"[connection]\nmax_subscriptions = {max_subscriptions}\n"
            f"queue_max_messages = {QUEUE_MAX_MESSAGES}\n"
            "[nats]\nstorage = \"file\"\nping_interval = 0.5\nmax_outstanding_pings = 2\n"
            "reconnect_wait_min = 0.1\nreconnect_wait_max = 1.0\nconsumer_heartbeat = 0.5\n"
            "stream_check_interval = 1.0\nconnect_timeout = 1.0\n"
            f"[shutdown]\ndrain_timeout = {DRAIN_TIMEOUT}\nreconnect_min_ms = 200\n"
            "reconnect_max_ms = 1000\n"
        )  # fmt: skip

    def _start_odin(self, proxy_port: int) -> None:
        self._write_config(64)
        log = (self.directory / "odin.log").open("ab")
        self.odin = subprocess.Popen(
            [sys.executable, "-m", "odin_fanout", "serve", "--workers", str(self.options.workers),
             "--port", "0", "--broker", "nats", "--nats-url", f"nats://127.0.0.1:{proxy_port}",
             "--config", str(self.config_path)],
            env=_clean_env(self.directory), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()

    def _start_publisher(self) -> int:
        log = (self.directory / "publisher.log").open("ab")
        self.publisher = subprocess.Popen(
            [sys.executable, "-m", "odin_fanout.publisher", "--port", "0",
             "--nats-url", f"nats://127.0.0.1:{self.nats.port}", "--autostart",
             "--rate", f"{self.options.rate:g}", "--tokens", ",".join(TOKENS),
             "--events", "trade", "--log-format", "json",
             "--set", "nats.reconnect_wait_min=0.1", "--set", "nats.reconnect_wait_max=1s",
             "--set", "nats.ping_interval=0.5"],
            env=_clean_env(self.directory), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()
        return self.publisher.pid

    def stop_all(self) -> None:
        """Everything this run started, by PID (also on the way out of a failed run)."""
        _stop(self.publisher)
        odin = self.odin
        for pid in list(self.odin_log.pids.values()) if odin is not None else []:
            if odin is not None and odin.poll() is not None and _is_odin_worker(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        _stop(self.odin, 15)
        self.nats.stop()

    # ---- clients ----

    def new_client(self, kind: str) -> Client:
        channels = self.rng.sample(list(CHANNELS), 2) if kind == "reader" else list(CHANNELS)
        client = Client(self, self._next_index, channels, kind)
        self._next_index += 1
        self.clients.append(client)
        assert self._nursery is not None
        self._nursery.start_soon(client.run)
        return client

    def readers(self) -> list[Client]:
        return [c for c in self.clients if c.kind == "reader" and not c.gone]

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(10)
            for client in list(self.clients):
                await client.heartbeat()

    async def _follow_log(self) -> None:
        while True:
            self.odin_log.poll()
            await trio.sleep(0.2)

    async def _watch_health(self) -> None:
        last: tuple[int, str] | None = None
        while True:
            status, body = await http_get(self.port, "/health")
            state = ""
            with contextlib.suppress(ValueError, AttributeError):
                state = str(orjson.loads(body).get("status", ""))
            if (status, state) != last:
                self.health.append(
                    {"t": round(trio.current_time() - self.started, 3), "http": status,
                     "status": state}
                )  # fmt: skip
                last = (status, state)
            await trio.sleep(0.5)

    # ---- recovery ----

    def watch(self, fault: str, cycle: int) -> Watch:
        eligible = {c.index for c in self.readers()}
        watch = Watch(fault, cycle, trio.current_time(), wall_ms(), eligible)
        for client in self.readers():
            client.watches.append(watch)
        self.watches.append(watch)
        return watch

    def recovery(self, watch: Watch) -> dict[str, Any]:
        still = {c.index for c in self.clients if not c.gone and c.kind == "reader"}
        waited = watch.eligible & still
        times = sorted(watch.done[i] for i in waited if i in watch.done)
        missing = sorted(waited - watch.done.keys())
        return {
            "clients": len(waited),
            "recovered": len(times),
            "p50_s": round(times[len(times) // 2], 3) if times else None,
            "max_s": round(times[-1], 3) if times else None,
            "not_recovered": missing[:20],
        }

    # ---- faults ----

    async def fault(self, name: str, cycle: int, at: float, slow: list[Client]) -> None:
        await trio.sleep_until(at)
        handler = getattr(self, f"_fault_{name}")
        await handler(cycle, slow)

    async def _fault_nats_kill(self, cycle: int, _slow: list[Client]) -> None:
        pid = await trio.to_thread.run_sync(self.nats.kill)
        self.log("nats_kill", cycle=cycle, pid=pid, port=self.nats.port)
        await trio.sleep(NATS_DOWN)
        new = await trio.to_thread.run_sync(self.nats.start)
        self.log("nats_restarted", cycle=cycle, pid=new, port=self.nats.port)
        self.watch("nats_kill", cycle)

    async def _fault_partition(self, cycle: int, _slow: list[Client]) -> None:
        """Hold, then drop: the link goes silent (blackhole: every byte held, connections
        open), then every connection is reset and new ones refused, then it heals."""
        assert self.proxy is not None
        held = self.proxy.set("blackhole")
        accepted = self.proxy.accepted
        self.log("partition", cycle=cycle, mode="blackhole", connections=held)
        await trio.sleep(PARTITION_HOLD)
        cut = self.proxy.set("reset")
        self.log("partition_reset", cycle=cycle, mode="reset", connections=cut)
        await trio.sleep(PARTITION_DROP)
        self.proxy.set("pass")
        self.log("partition_healed", cycle=cycle, connections=held + cut,
                 attempts_during=self.proxy.accepted - accepted,
                 refused=self.proxy.refused)  # fmt: skip
        self.watch("partition", cycle)

    async def _fault_storm(self, cycle: int, _slow: list[Client]) -> None:
        live = [c for c in self.readers() if c.subscribed]
        chosen = self.rng.sample(live, len(live) // 2)
        for client in chosen:
            client.drop()
        self.log("storm", cycle=cycle, dropped=len(chosen), of=len(live))
        self.watch("storm", cycle)

    async def _fault_slow(self, cycle: int, slow: list[Client]) -> None:
        reading = [c for c in slow if c.subscribed]
        for client in reading:
            client.stop_reading()
        self.log("slow", cycle=cycle, stopped_reading=len(reading), of=len(slow))

    async def _fault_churn(self, cycle: int, _slow: list[Client]) -> None:
        left = returned = joined = 0
        self.log("churn", cycle=cycle, seconds=CHURN_SECONDS, per_second="10 %")
        async with trio.open_nursery() as nursery:
            for _ in range(CHURN_SECONDS):
                live = [c for c in self.readers() if c.subscribed]
                # A tenth, at least one; none while every client is reconnecting (a partition
                # or a killed worker can leave none subscribed at that moment).
                for client in self.rng.sample(live, min(len(live), max(1, len(live) // 10))):
                    for_good = self.rng.random() < 0.5
                    nursery.start_soon(partial_leave(client, for_good))
                    if for_good:
                        self.new_client("reader")
                        joined += 1
                    else:
                        returned += 1
                    left += 1
                await trio.sleep(1)
        self.log("churn_done", cycle=cycle, left=left, came_back=returned, replaced_by_new=joined)
        self.watch("churn", cycle)

    async def _fault_sighup(self, cycle: int, _slow: list[Client]) -> None:
        assert self.odin is not None
        self.reload_count += 1
        self._write_config(64 - self.reload_count % 2)
        self.odin.send_signal(signal.SIGHUP)
        self.log("sighup", cycle=cycle, pid=self.odin.pid, reload=self.reload_count)
        self.watch("sighup", cycle)

    async def _fault_worker_kill(self, cycle: int, _slow: list[Client]) -> None:
        self.odin_log.poll()
        slot = self.rng.choice(sorted(self.odin_log.pids))
        pid = self.odin_log.pids[slot]
        if not _is_odin_worker(pid):
            self.log("worker_kill_skipped", cycle=cycle, worker=slot, pid=pid)
            return
        os.kill(pid, signal.SIGKILL)
        self.log("worker_kill", cycle=cycle, worker=slot, pid=pid)
        self.watch("worker_kill", cycle)

    # ---- cycles ----

    async def cycle(self, number: int, start: float, length: float) -> None:
        """Every fault once, around one anchor, so that they overlap."""
        rng = self.rng
        count = self.options.slow or max(2, self.options.clients // 10)
        slow = [self.new_client("slow") for _ in range(count)]
        anchor = start + rng.uniform(0.15, 0.3) * length
        plan = {name: anchor + rng.uniform(-2.5, 2.5) for name in FAULTS}
        order = sorted(plan.items(), key=lambda item: item[1])
        self.log("cycle", cycle=number, length=round(length, 1),
                 plan={name: round(at - self.started, 2) for name, at in order})  # fmt: skip
        async with trio.open_nursery() as nursery:
            for name, at in plan.items():
                nursery.start_soon(self.fault, name, number, at, slow)
        await trio.sleep_until(start + length - SLOW_READ_AGAIN)
        for client in slow:
            client.read_again()
        await trio.sleep(SLOW_READ_AGAIN)
        cut = sum(c.cut_by_server for c in slow)
        still = [c for c in slow if not c.gone]
        self.log(
            "slow_outcome", cycle=number, slow=len(slow), cut_by_server=cut,
            closed_otherwise=len(slow) - cut - len(still), still_served=len(still),
        )  # fmt: skip
        for client in still:
            await client.leave(for_good=True, why="slow client's cycle ended")

    # ---- the tail check and the drain ----

    async def tail_check(self) -> dict[str, Any]:
        """With the publisher stopped: every reading client reaches the stream's last
        position on each of its channels (a loss at the tail shows no gap)."""
        probe = await probe_positions(self.port)
        self.log("tail", positions=probe)
        pending = {c.index: c for c in self.readers()}
        with trio.move_on_after(20):
            while pending:
                for index, client in list(pending.items()):
                    have = client.continuity.positions()
                    if all(
                        have.get(ch, {}).get("epoch") == probe[ch]["epoch"]
                        and have[ch]["seq"] >= probe[ch]["seq"]
                        for ch in client.channels
                        if ch in probe
                    ):
                        del pending[index]
                await trio.sleep(0.1)
        for client in pending.values():
            have = client.continuity.positions()
            for ch in client.channels:
                if ch in probe and have.get(ch, {}).get("seq", -1) < probe[ch]["seq"]:
                    client.tail_missing += 1
        return {"short": sorted(pending)[:50], "short_count": len(pending)}

    async def main(self) -> None:
        options = self.options
        self.started = trio.current_time()
        end = self.started + options.duration
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nats_pid = await trio.to_thread.run_sync(self.nats.start)
            self.log("nats_started", pid=nats_pid, port=self.nats.port, store=str(self.nats.store))
            self.proxy = PartitionProxy(self.nats.port)
            proxy_port = await nursery.start(self.proxy.serve)
            self.log("proxy_started", port=proxy_port)
            self._start_odin(proxy_port)
            assert self.odin is not None
            nursery.start_soon(self._follow_log)
            with trio.fail_after(60):
                ready = await self.odin_log.wait_for("workers_ready")
                while len(self.odin_log.find("broker_ready")) < options.workers:
                    await self.odin_log.wait_for("broker_ready")
            self.port = int(ready["websocket"][0].rsplit(":", 1)[1].split("/", 1)[0])
            self.log("odin_started", pid=self.odin.pid, port=self.port,
                     workers=dict(self.odin_log.pids))  # fmt: skip
            publisher = self._start_publisher()
            self.log("publisher_started", pid=publisher, rate=options.rate)
            nursery.start_soon(self._watch_health)
            nursery.start_soon(self._heartbeats)
            for _ in range(options.clients):
                self.new_client("reader")
                await trio.sleep(0.01)
            await trio.sleep_until(self.started + WARMUP)
            connected = sum(c.subscribed for c in self.clients)
            self.log("clients_connected", connected=connected, of=len(self.clients))
            window = max(options.duration - WARMUP - SETTLE, 20.0)
            cycles = max(1, int(window // options.cycle))
            length = window / cycles
            for number in range(cycles):
                await self.cycle(number, self.started + WARMUP + number * length, length)
            await trio.sleep_until(max(end - 3, trio.current_time()))
            # The tail: no more publishing; everyone must reach the stream's last positions.
            code = await trio.to_thread.run_sync(_stop, self.publisher)
            self.log("publisher_stopped", code=code)
            await trio.sleep(1)
            tail = await self.tail_check()
            self.log("tail_checked", **tail)
            publisher = self._start_publisher()
            self.log("publisher_started", pid=publisher, rate=options.rate)
            await trio.sleep(2)
            # SIGTERM under load: drain, clients told to reconnect, exit 0.
            self.stopping = True
            before = trio.current_time()
            self.odin.send_signal(signal.SIGTERM)
            self.log("sigterm", pid=self.odin.pid)
            rc = await trio.to_thread.run_sync(_wait, self.odin, DRAIN_TIMEOUT + 15)
            self.log("odin_exited", code=rc, drain_s=round(trio.current_time() - before, 2))
            code = await trio.to_thread.run_sync(_stop, self.publisher)
            self.log("publisher_stopped", code=code)
            with trio.move_on_after(5):
                for client in self.clients:
                    if client.subscribed:
                        await client.ended.wait()
            self.result["sigterm"] = {
                "exit_code": rc,
                "drain_s": round(trio.current_time() - before, 2),
                "closes": dict(sum((c.closes for c in self.clients), Counter())),
            }
            nursery.cancel_scope.cancel()
        self.odin_log.poll()


def partial_leave(client: Client, for_good: bool) -> Any:
    async def go() -> None:
        await client.leave(for_good=for_good, why="churn: replaced by a new client")

    return go


def _wait(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _is_odin_worker(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"odin_fanout" in argv and b"serve" in argv


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """A GET on loopback, bounded (0: no answer)."""
    try:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return 0, b""


async def probe_positions(port: int) -> dict[str, dict[str, Any]]:
    """The channels' latest positions, from a fresh subscription's ack."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request, accept = upgrade_request("127.0.0.1", port, "/ws")
            await stream.send_all(request)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            end = head.index(b"\r\n\r\n")
            if problem := check_upgrade(head[:end], accept):
                raise ConnectionError(problem)
            body = orjson.dumps({"type": "subscribe", "data": {"channels": list(CHANNELS)}})
            await stream.send_all(client_frame(OP_TEXT, body))
            reader = FrameReader()
            data = head[end + 4 :]
            while True:
                for opcode, payload in reader.feed(data) if data else ():
                    if opcode == OP_TEXT:
                        document = orjson.loads(payload)
                        if document.get("type") == "subscription_ack":
                            positions: dict[str, dict[str, Any]] = document.get("positions", {})
                            return positions
                data = await stream.receive_some(65536)


# ---- the verdict ---------------------------------------------------------------------------

EVIDENCE = {
    # fault: (our event, Odin log event(s) that show its effect)
    "nats_kill": ("nats_kill", ("nats_disconnected",)),
    "partition": ("partition", ("nats_disconnected",)),
    "storm": ("storm", ()),
    "slow": ("slow", ()),
    "churn": ("churn", ()),
    "sighup": ("sighup", ("config_reloaded",)),
    "worker_kill": ("worker_kill", ("worker_exited", "worker_started")),
    "sigterm": ("sigterm", ("draining", "exited")),
}


def verdict(chaos: Chaos) -> dict[str, Any]:
    problems: list[str] = []
    events = chaos.events
    records = [r for _, r in chaos.odin_log.records]
    odin_events = Counter(str(r.get("event")) for r in records)
    happened: dict[str, dict[str, Any]] = {}
    for fault, (ours, theirs) in EVIDENCE.items():
        mine = [e for e in events if e["event"] == ours]
        logged = {name: odin_events.get(name, 0) for name in theirs}
        effect = True
        if fault == "storm":
            effect = any(e["dropped"] > 0 for e in mine)
        elif fault == "slow":
            effect = any(e["stopped_reading"] > 0 for e in mine)
        elif fault == "partition":
            effect = any(e["connections"] + e["attempts_during"] > 0
                         for e in events if e["event"] == "partition_healed")  # fmt: skip
        elif fault == "churn":
            effect = any(e["left"] > 0 for e in events if e["event"] == "churn_done")
        elif fault == "sighup":
            effect = logged["config_reloaded"] >= len(mine) * chaos.options.workers
        elif fault == "worker_kill":
            effect = sum(
                1 for r in records
                if r.get("event") == "worker_exited" and "SIGKILL" in str(r.get("exit"))
            ) >= len(mine)  # fmt: skip
        ok = bool(mine) and effect and all(logged.values())
        happened[fault] = {"injected": len(mine), "odin_log": logged, "ok": ok}
        if not ok:
            problems.append(f"fault {fault} did not visibly happen: {happened[fault]}")
    readers = [c for c in chaos.clients if c.kind == "reader"]
    slow = [c for c in chaos.clients if c.kind == "slow"]
    for group, clients, fields in (
        ("reading", readers, ("lost_silently", "duplicates", "reordered", "bad_recoveries",
                               "bad_frames")),
        ("slow", slow, ("duplicates", "reordered", "bad_recoveries", "bad_frames")),
    ):  # fmt: skip
        reports = [c.report() for c in clients]
        for field in fields:
            bad = [r["client"] for r in reports if r[field]]
            if bad:
                total = sum(r[field] for r in reports)
                problems.append(f"{group} clients with {field}: {len(bad)} ({total}): {bad[:10]}")
    never = [c.index for c in readers if c.connects == 0]
    if never:
        problems.append(f"reading clients that never connected: {never[:10]}")
    recoveries = []
    for watch in chaos.watches:
        at = round(watch.end_mono - chaos.started, 2)
        figures = {"fault": watch.fault, "cycle": watch.cycle, "at_s": at,
                   **chaos.recovery(watch)}  # fmt: skip
        recoveries.append(figures)
        if figures["not_recovered"]:
            problems.append(
                f"after {watch.fault} (cycle {watch.cycle}) {len(figures['not_recovered'])} "
                f"clients had no fresh event within the run: {figures['not_recovered'][:5]}"
            )
        elif figures["max_s"] is not None and figures["max_s"] > RECOVERY_BOUND:
            problems.append(f"after {watch.fault} recovery took {figures['max_s']} s")
    sigterm = chaos.result.get("sigterm", {})
    if sigterm.get("exit_code") != 0:
        problems.append(f"odin exited {sigterm.get('exit_code')} after SIGTERM (expected 0)")
    bad_lines = [
        r for r in records
        if r.get("level") in ("error", "critical") or r.get("event") == "_not_json"
        or "exc_info" in r or "traceback" in r
    ]  # fmt: skip
    expected_errors = {"worker_killed"}
    unexpected = [r for r in bad_lines if r.get("event") not in expected_errors]
    if unexpected:
        problems.append(
            f"odin logged {len(unexpected)} error lines: "
            f"{sorted(Counter(str(r.get('event')) for r in unexpected).items())}"
        )
    warnings = Counter(str(r.get("event")) for r in records if r.get("level") == "warning")
    return {
        "ok": not problems,
        "problems": problems,
        "faults": happened,
        "recovery": recoveries,
        "odin_warnings": dict(warnings.most_common()),
        "odin_errors": [r for r in unexpected][:20],
    }


def totals(clients: Sequence[Client]) -> dict[str, int]:
    reports = [c.report() for c in clients]
    keys = ("events", "lost_silently", "silent_gaps", "tail_missing", "announced_gaps",
            "not_recovered", "recovered", "duplicates", "reordered", "bad_recoveries",
            "epoch_changes", "connects", "reconnects", "connect_failures", "reconnect_hints",
            "bad_frames", "errors", "cut_by_server", "closed_1008")  # fmt: skip
    return {key: int(sum(r[key] for r in reports)) for key in keys} | {"clients": len(reports)}


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def summary(result: dict[str, Any]) -> str:
    lines = []
    o = result["options"]
    lines.append(
        f"odin-stress chaos: {o['duration']:g} s, {o['clients']} clients, {o['rate']:g} ev/s, "
        f"{o['workers']} workers, seed {o['seed']}, {result['cycles']} cycle(s); "
        f"elapsed {result['elapsed_s']} s"
    )
    for group in ("reading", "slow"):
        t = result["totals"][group]
        lines.append(
            f"  {group:8} clients {t['clients']:5}  events {t['events']:9}  "
            f"lost silently {t['lost_silently']}  (tail {t['tail_missing']})  "
            f"announced gaps {t['announced_gaps']}  recovered:false {t['not_recovered']}  "
            f"duplicated {t['duplicates']}  reordered {t['reordered']}  "
            f"bad recoveries {t['bad_recoveries']}  reconnects {t['reconnects']}  "
            f"closed 1008 (slow consumer) {t['closed_1008']}"
        )
    lines.append(f"  latency ms (live events): {result['latency_ms']}")
    lines.append("  faults:")
    for name, fault in result["verdict"]["faults"].items():
        lines.append(f"    {name:12} injected {fault['injected']}  odin log {fault['odin_log']}"
                     f"  {'ok' if fault['ok'] else 'NOT SEEN'}")  # fmt: skip
    lines.append("  time to recover (every reading client has an event published after the "
                 "fault ended):")  # fmt: skip
    for r in result["verdict"]["recovery"]:
        lines.append(
            f"    {r['fault']:12} cycle {r['cycle']:3} at {r['at_s']:8.1f} s  "
            f"{r['recovered']}/{r['clients']}  p50 {r['p50_s']} s  max {r['max_s']} s"
        )
    for r in result["slow_outcomes"]:
        lines.append(
            f"  slow cycle {r['cycle']}: {r['slow']} slow, {r['cut_by_server']} cut off by the "
            f"server (1008), {r['closed_otherwise']} closed otherwise, "
            f"{r['still_served']} still served"
        )
    s = result["sigterm"]
    lines.append(f"  SIGTERM: exit {s.get('exit_code')}, drain {s.get('drain_s')} s, "
                 f"client closes {s.get('closes')}")  # fmt: skip
    lines.append(f"  odin warnings: {result['verdict']['odin_warnings']}")
    lines.append(f"  health: {[(h['t'], h['http'], h['status']) for h in result['health']]}")
    if result["verdict"]["ok"]:
        lines.append("VERDICT: every invariant held")
    else:
        lines.append("VERDICT: FAILED")
        lines.extend(f"  - {p}" for p in result["verdict"]["problems"])
    return "\n".join(lines)


def run(options: Options, *, json_path: Path | None, keep: Path | None) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="odin-chaos-"))
    chaos = Chaos(options, directory)
    began = time.monotonic()
    try:
        trio.run(chaos.main)
    finally:
        chaos.stop_all()
    readers = [c for c in chaos.clients if c.kind == "reader"]
    slow = [c for c in chaos.clients if c.kind == "slow"]
    window = max(options.duration - WARMUP - SETTLE, 20.0)
    result: dict[str, Any] = {
        "options": attrs.asdict(options),
        "machine": machine(),
        "cycles": max(1, int(window // options.cycle)),
        "elapsed_s": round(time.monotonic() - began, 1),
        "verdict": verdict(chaos),
        "totals": {"reading": totals(readers), "slow": totals(slow)},
        "latency_ms": chaos.latency.summary_ms(),
        "sigterm": chaos.result.get("sigterm", {}),
        "slow_outcomes": [e for e in chaos.events if e["event"] == "slow_outcome"],
        "health": chaos.health,
        "failures": dict(chaos.failures.most_common(10)),
        "events": chaos.events,
        "clients": [c.report() for c in chaos.clients],
    }
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("odin.log", "nats.log", "publisher.log", "odin.toml"):
            if (directory / name).exists():
                shutil.copy(directory / name, keep / name)
        result["logs"] = str(keep)
    shutil.rmtree(directory, ignore_errors=True)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1))
    return result


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=_positive(float),
        default=120.0,
        help="seconds the run lasts (at least 40)",
    )
    parser.add_argument(
        "--clients",
        type=_positive(int),
        default=100,
        help="reading clients (slow ones come on top)",
    )
    parser.add_argument(
        "--rate",
        type=_positive(float),
        default=50.0,
        help="events/s the publisher publishes (over 3 channels)",
    )
    parser.add_argument("--seed", type=int, default=1, help="schedules the faults")
    parser.add_argument("--workers", type=_positive(int), default=2, help="odin serve --workers")
    parser.add_argument(
        "--cycle",
        type=_positive(float),
        default=40.0,
        help="seconds per cycle of faults (every fault once per cycle)",
    )
    parser.add_argument(
        "--slow",
        type=int,
        default=0,
        help="slow clients per cycle (0: a tenth of --clients, at least 2)",
    )
    parser.add_argument("--json", type=Path, help="write the result there")
    parser.add_argument("--keep-logs", type=Path, help="copy Odin's, NATS's and the "
                        "publisher's logs to this directory")  # fmt: skip


def main_with(args: argparse.Namespace) -> int:
    if args.duration < 40 or args.duration > MAX_DURATION:
        sys.stderr.write(f"odin-stress chaos: --duration between 40 and {MAX_DURATION:g} s\n")
        return 2
    if args.clients > MAX_CLIENTS or args.workers < 2:
        sys.stderr.write(f"odin-stress chaos: at most {MAX_CLIENTS} clients, at least 2 "
                         "workers (a worker is killed)\n")  # fmt: skip
        return 2
    options = Options(duration=args.duration, clients=args.clients, rate=args.rate,
                      seed=args.seed, workers=args.workers, cycle=args.cycle,
                      slow=max(0, args.slow))  # fmt: skip
    result = run(options, json_path=args.json, keep=args.keep_logs)
    print(summary(result))
    return 0 if result["verdict"]["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odin-stress chaos", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main_with(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

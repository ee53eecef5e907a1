"""One fan-out run: a server under test (``stress/odin_fanout/stress/peers``) and the load clients
started pinned, the clients connected and subscribed, the server told to publish (at a rate, or a
burst), CPU and memory sampled from /proc around it, and the run's record built."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from odin_fanout.stress.children import Child, expect_all, pinned
from odin_fanout.stress.fanout.results import anomalies, merge_results
from odin_fanout.stress.procstat import (
    Sample,
    core_usage,
    count_fds,
    foreign_cpu_pct,
    proc_cpu_seconds,
    proc_memory_kib,
    wait_quiet,
)

SERVERS = {
    "odin": "odin_fanout.stress.peers.odin_server",
    "triows": "odin_fanout.stress.peers.triows_server",
    "websockets": "odin_fanout.stress.peers.websockets_server",
    "picows": "odin_fanout.stress.peers.picows_server",
    "nats-ws": "odin_fanout.stress.peers.nats_ws_server",
}
DEFAULT_SERVERS = "odin,websockets,picows,nats-ws,triows"
CLIENT = "odin_fanout.stress.load_client"
# Connections per load-client process when --client-processes is 0 (automatic).
CONNECTIONS_PER_CLIENT = 9000


def split(total: int, parts: int) -> list[int]:
    """``total`` connections over ``parts`` processes, as evenly as possible."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


class Bench:
    """The runs of one invocation: which CPUs the server and the clients are pinned to, how many
    client processes, and one method a kind of run (``run_load``, ``run_idle``)."""

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

    # ``event`` from every child, all within a timeout (bench_workers uses it too).
    expect_all = staticmethod(expect_all)

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

"""Fan-out benchmark: one publisher, N WebSocket subscribers, Odin and its peers compared.

Usage (from the repository root)::

    .venv/bin/odin-stress bench fanout [--connections 1000] [--rates 20,100 | --offered
        20000,100000] [--duration 8] [--servers odin,websockets,picows,nats-ws,triows]
        [--repeats 1] [--client-processes K] [--json out.json]
    .venv/bin/odin-stress bench fanout --burst 500 --connections 1000
    .venv/bin/odin-stress bench fanout --idle-memory --connections 5000 --servers odin,triows

Method (as in shared/reference/stack-findings.md section 3): each server under test
(``stress/odin_fanout/stress/peers``) runs as its own process pinned to one CPU with ``taskset``;
the load client (``stress/odin_fanout/stress/load_client.py``) runs pinned to the other CPU, as one
process or split over ``--client-processes`` processes (all on that CPU; their results are merged:
counts summed, latency samples pooled). The clients open N connections and subscribe them all; then
the server publishes ``rate * duration`` messages at ``rate`` per second, each to every subscriber
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

The figures, and how to read them, are in ``docs/performance.md``; the modules this driver uses
are described in ``stress/odin_fanout/stress/fanout/__init__.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

from odin_fanout.stress.children import Child, raise_fd_limit
from odin_fanout.stress.fanout.report import Report, write_json
from odin_fanout.stress.fanout.results import all_ratios
from odin_fanout.stress.fanout.runs import CONNECTIONS_PER_CLIENT, DEFAULT_SERVERS, SERVERS, Bench
from odin_fanout.stress.machine import calibrate, machine_info, machine_line

# Files a process holds besides its sockets (listener, epoll, pipes, logs, ...), about.
SPARE_FDS = 50


def _numbers(text: str, kind: type[float] | type[int]) -> list[Any]:
    return [kind(float(item)) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m odin_fanout.stress.bench_fanout", description=__doc__.splitlines()[0]
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
        "command": [
            sys.executable,
            "-m",
            "odin_fanout.stress.bench_fanout",
            *(argv or sys.argv[1:]),
        ],
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
    report = Report()
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as logdir:
        bench = Bench(args, Path(logdir))
        document["config"]["client_processes"] = bench.client_processes
        document["notes"].extend(bench.notes)
        document["notes"].extend(check_fds(args, bench.client_processes, soft))
        document["pinning"] = {"server_cpu": bench.server_cpu, "client_cpu": bench.client_cpu}
        machine["calibration"] = calibrate(bench.server_cpu)
        report.line(machine_line(machine))
        report.line(config_line(args, bench))
        for note in document["notes"]:
            report.line(f"note: {note}")
        try:
            run_all(args, bench, document, report)
        finally:
            Child.stop_all()
    document["ratios"] = all_ratios(document, args.reference)
    report.line("")
    report.line(machine_line(machine))
    report.line(config_line(args, bench))
    report.summary(document, args.reference)
    write_json(args.json, document)
    if args.json:
        report.line(f"results: {args.json}")
    return 0


def run_all(
    args: argparse.Namespace, bench: Bench, document: dict[str, Any], report: Report
) -> None:
    """Every run, interleaved (for each repeat, for each rate or burst, each server in turn),
    each added to ``document`` (and the JSON file rewritten) as it ends."""
    if args.idle_memory:
        for repeat, server in itertools.product(range(1, args.repeats + 1), args.server_list):
            record = bench.run_idle(server)
            record["repeat"] = repeat
            document["idle"].append(record)
            report.idle_run(record)
            write_json(args.json, document)
        return
    plan = [(0.0, burst) for burst in args.burst_list] or [(rate, 0) for rate in args.rate_list]
    for repeat, (rate, burst), server in itertools.product(
        range(1, args.repeats + 1), plan, args.server_list
    ):
        record = bench.run_load(server, rate, burst, repeat)
        document["runs"].append(record)
        report.load_run(record)
        write_json(args.json, document)


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

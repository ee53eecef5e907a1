"""``odin-stress`` / ``python -m stress``: load, continuity and latency against an Odin
server, and the benchmarks against peers.

    odin-stress run --profile light [--url ws://127.0.0.1:3002/ws] [--json out.json]
    odin-stress profiles
    odin-stress bench fanout|ingest|publisher|workers [their own options]

Exit codes of ``run``: 0 all good; 1 an invariant broke (a silent gap, a duplicate, an event
out of order, a wrong recovery answer, a bad frame); 2 a usage error; 3 a threshold was
missed (clients that could not connect, p99 latency, recoveries, unexpected closes).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import attrs

from odin_fanout.stress import report
from odin_fanout.stress.profiles import (
    PROFILES,
    SUBSCRIPTION_MODES,
    Profile,
    default_workers,
    split,
)
from odin_fanout.stress.run import run

EX_USAGE = 2
MAX_CONNECTIONS = 50_000
MAX_DURATION = 4 * 3600.0
BENCHES = {
    "fanout": "odin_fanout.stress.bench_fanout",
    "ingest": "odin_fanout.stress.bench_ingest",
    "publisher": "odin_fanout.stress.bench_publisher",
    "workers": "odin_fanout.stress.bench_workers",
}


def _positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odin-stress",
        description="Load, continuity and latency checks against an Odin server, and the "
        "benchmarks beside its peers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    go = commands.add_parser("run", help="a load run against a server")
    go.add_argument("--profile", choices=sorted(PROFILES), default="light")
    go.add_argument("--url", default="ws://127.0.0.1:3002/ws", help="the server's WebSocket URL")
    go.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    go.add_argument("--connections", type=_positive(int), help="clients (profile's by default)")
    go.add_argument("--duration", type=_positive(float), help="seconds the run lasts")
    go.add_argument("--ramp", type=_positive(float), help="new connections per second")
    go.add_argument("--channels", help="comma-separated channels to pick from")
    go.add_argument("--channels-per-client", type=_positive(int))
    go.add_argument("--subscription-mode", choices=SUBSCRIPTION_MODES)
    go.add_argument("--connect-timeout", type=_positive(float))
    go.add_argument("--storm-at", type=float, help="seconds in: clients drop and come back")
    go.add_argument("--storm-fraction", type=float)
    go.add_argument("--slow-fraction", type=float, help="clients that stop reading")
    go.add_argument("--churn", type=float, help="fraction of clients leaving each second")
    go.add_argument("--workers", type=_positive(int), help="client processes")
    go.add_argument("--publisher-url", help="odin-publisher's API, to drive at --rate")
    go.add_argument("--rate", type=_positive(float), help="events/s to ask of the publisher")
    go.add_argument("--server-pid", type=int, help="sample the server's CPU and RSS in /proc")
    go.add_argument("--metrics-url", help="the server's /metrics (default: the URL's port)")
    go.add_argument("--seed", type=int, default=1)
    go.add_argument("--json", type=Path, help="write the result there")
    go.add_argument("--plain", action="store_true", help="no live display, even on a terminal")
    go.add_argument("--min-connected-pct", type=float, default=99.0)
    go.add_argument("--max-p99-ms", type=float)
    go.add_argument("--min-recovered-pct", type=float)
    go.add_argument("--max-unexpected-closes", type=int, default=0)
    commands.add_parser("profiles", help="list the profiles")
    from odin_fanout.stress import chaos

    chaos.add_arguments(
        commands.add_parser("chaos", help="every fault at once (odin_fanout.stress.chaos)")
    )
    from odin_fanout.stress import soak

    soak.add_arguments(commands.add_parser("soak", help="hours of traffic and churn, sampled "
                                           "for leaks (odin_fanout.stress.soak)"))  # fmt: skip
    bench = commands.add_parser("bench", help="the benchmarks (see their --help)")
    bench.add_argument("which", choices=sorted(BENCHES))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False


def profile_from(args: argparse.Namespace) -> Profile:
    profile = PROFILES[args.profile]
    changes = {
        "connections": args.connections,
        "duration": args.duration,
        "ramp_per_s": args.ramp,
        "channels": tuple(c.strip() for c in args.channels.split(",") if c.strip())
        if args.channels
        else None,
        "channels_per_client": args.channels_per_client,
        "subscription_mode": args.subscription_mode,
        "connect_timeout": args.connect_timeout,
        "storm_at": args.storm_at,
        "storm_fraction": args.storm_fraction,
        "slow_fraction": args.slow_fraction,
        "churn_per_s": args.churn,
        "publish_rate": args.rate,
    }
    return attrs.evolve(profile, **{k: v for k, v in changes.items() if v is not None})


def usage_error(message: str) -> int:
    sys.stderr.write(f"odin-stress: {message}\n")
    return EX_USAGE


def run_command(args: argparse.Namespace) -> int:
    url = urlsplit(args.url)
    if url.scheme != "ws" or not url.hostname:
        return usage_error(f"--url must be ws://host:port/path, got {args.url!r}")
    if not args.allow_remote and not is_loopback(url.hostname):
        return usage_error(f"{url.hostname} is not loopback; pass --allow-remote to load it")
    profile = profile_from(args)
    if profile.connections > MAX_CONNECTIONS or profile.duration > MAX_DURATION:
        return usage_error(
            f"a run is bounded: at most {MAX_CONNECTIONS} connections and {MAX_DURATION:g} s"
        )
    if not 0 <= profile.slow_fraction <= 1 or not 0 <= profile.storm_fraction <= 1:
        return usage_error("fractions are between 0 and 1")
    if args.rate and not args.publisher_url:
        return usage_error("--rate drives the publisher: give --publisher-url too")
    port = url.port or 80
    workers = args.workers or default_workers(profile.connections, os.cpu_count() or 1)
    plans = split(profile, workers=workers, host=url.hostname, port=port,
                  path=url.path or "/", seed=args.seed)  # fmt: skip
    metrics_url = args.metrics_url or f"http://{url.hostname}:{port}/metrics"
    progress = report.Progress(live=sys.stdout.isatty() and not args.plain)
    try:
        snapshot, notes = run(
            plans,
            profile,
            metrics_url=metrics_url,
            server_pid=args.server_pid,
            publisher_url=args.publisher_url,
            on_progress=progress.update,
        )
    finally:
        progress.close()
    result = report.figures(snapshot, profile)
    thresholds = report.Thresholds(
        min_connected_pct=args.min_connected_pct,
        max_p99_ms=args.max_p99_ms,
        min_recovered_pct=args.min_recovered_pct,
        max_unexpected_closes=args.max_unexpected_closes,
    )
    code, problems = report.verdict(result, thresholds)
    result.update(profile=args.profile, url=args.url, exit_code=code, problems=problems,
                  notes=notes)  # fmt: skip
    report.print_table(result, problems, notes)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return code


def _stop_on_sigterm() -> None:
    """SIGTERM ends a run like Ctrl-C: as an exception, so the ``finally`` blocks stop the
    servers, NATS and publishers it started (by default the signal kills this process alone
    and leaves them running)."""

    def stop(signum: int, frame: object) -> None:
        del frame
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _stop_on_sigterm()
    if args.command == "profiles":
        for name, profile in sorted(PROFILES.items()):
            print(f"{name:16} {profile.connections:6} clients {profile.duration:6g} s  "
                  f"{profile.description}")  # fmt: skip
        return 0
    if args.command == "chaos":
        from odin_fanout.stress import chaos

        return chaos.main_with(args)
    if args.command == "soak":
        from odin_fanout.stress import soak

        return soak.run_soak(args)
    if args.command == "bench":
        import importlib

        module = importlib.import_module(BENCHES[args.which])
        sys.argv = [f"odin-stress bench {args.which}", *args.rest]
        module.main()
        return 0
    return run_command(args)

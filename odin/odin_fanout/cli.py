"""``odin`` / ``python -m odin``: the command line, and the only ``trio.run``.

Exit codes (``EPILOG``, shown by ``--help``): 0 after a clean stop, 1 when it cannot start, 2 on
a usage error, 78 (EX_CONFIG) on a bad configuration, 130 when a second signal cuts the drain
short. SIGHUP reloads the configuration (odin_fanout.server.reload).

One command, three roles: a single server (``server.workers = 1``); a supervisor of N workers
(odin_fanout.host.supervisor); or one of those workers (``serve --worker SPEC``, which only a
supervisor passes).
"""

from __future__ import annotations

import argparse
import gc
import random
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio

from odin_fanout import ctl, logs
from odin_fanout.broker.base import Broker
from odin_fanout.broker.embedded import EmbeddedNatsError, run_embedded_nats
from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.config import Config, ConfigError, as_dict, load_config, set_options
from odin_fanout.host.spec import WorkerSpec
from odin_fanout.host.supervisor import Ready, Supervisor, WorkerStartError, worker_count
from odin_fanout.host.worker import WorkerLink
from odin_fanout.metrics import Metrics
from odin_fanout.server.app import Listening, OdinServer, StartError
from odin_fanout.server.control import ControlServer
from odin_fanout.server.page import page_enabled
from odin_fanout.server.reload import apply, plan_reload
from odin_fanout.server.tls import server_context
from odin_fanout.server.tokens import load_keys
from odin_fanout.simulator.model import Market
from odin_fanout.simulator.runner import run_simulator, wall_clock
from odin_fanout.startup import start
from odin_fanout.version import __version__

EX_START = 1
EX_FORCED = 130
WORKER_READY_WAIT = 30.0
"""Seconds a worker waits for its broker before it accepts clients all the same."""

DESCRIPTION = (
    "Odin streams live market events to WebSocket clients, in order, with positions that let "
    "a client that reconnects get exactly what it missed."
)
EPILOG = """\
signals:
  SIGTERM, SIGINT  drain: clients are told to reconnect, then the server exits 0;
                   a second signal exits at once with 130 (with --workers, the
                   supervisor forwards them to every worker)
  SIGHUP           reload the configuration file and environment (config_reloaded)

exit codes:
  0   stopped cleanly
  1   could not start (an address already in use, the embedded NATS failed)
  2   usage error
  78  bad configuration (the message names the field)
  130 stopped by a second signal before the drain finished
"""


def _add_common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    command.add_argument("--host", help="address to listen on (server.host)")
    command.add_argument("--port", type=int, help="port, 0 for any free one (server.port)")
    command.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes on the port; 0: one per usable core (server.workers)",
    )
    command.add_argument("--rate", type=float, help="simulated events per second (simulator.rate)")
    command.add_argument("--tokens", help="comma-separated symbols (simulator.tokens)")
    command.add_argument("--events", help="comma-separated event types (simulator.events)")
    command.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="(log.level)"
    )
    command.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        help="json lines, or readable lines; auto: readable on a terminal (log.format)",
    )
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set any configuration field, e.g. --set connection.idle_timeout=30s",
    )
    command.add_argument(
        "--check-config", action="store_true", help="print the effective configuration and exit"
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="odin", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"odin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the WebSocket fan-out server",
        description="Run the WebSocket fan-out server.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    _add_common(serve)
    serve.add_argument(
        "--broker", choices=["nats", "memory"], help="broker to use (broker.kind; default nats)"
    )
    serve.add_argument("--nats-url", help="NATS server URL; none starts an embedded one (nats.url)")
    serve.add_argument(
        "--simulate", action="store_true", help="publish simulated market events (simulator)"
    )
    # Only a supervisor starts a worker; not for people, so not in --help.
    serve.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    demo = commands.add_parser(
        "demo",
        help="an embedded NATS, the price simulator publishing into it, and the server",
        description="Run the server with simulated market events and print where to look.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    _add_common(demo)
    demo.set_defaults(broker="nats", nats_url=None, simulate=True, demo=True)
    ctl.add_parser(commands)
    return parser


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The configuration the command line sets (``--set`` and the flags), as overrides."""
    overrides = set_options(args.set)
    flags = {
        "server.host": args.host,
        "server.port": args.port,
        "server.workers": args.workers,
        "broker.kind": args.broker,
        "nats.url": args.nats_url,
        "simulator.rate": args.rate,
        "simulator.tokens": args.tokens,
        "simulator.events": args.events,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if args.simulate:
        overrides["simulator.enabled"] = True
    if getattr(args, "demo", False):
        overrides["nats.url"] = ""  # always the embedded server
        overrides.setdefault("log.level", "warning")  # the terminal is for the banner
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ctl":
        return ctl.run(args)
    worker = None
    if getattr(args, "worker", None):
        try:
            worker = WorkerLink(WorkerSpec.decode(args.worker))
        except ValueError as exc:
            parser.error(f"--worker: {exc}")  # exits 2
    if worker is not None:
        spec = worker.spec
        run = _Run(Path(spec.config_file) if spec.config_file else None, spec.overrides)
    else:
        run = _Run(args.config, config_overrides(args))
    started = start(run.load, check_config=args.check_config)
    if isinstance(started, int):
        return started
    config, unknown_env = started
    workers = 1 if worker is not None else worker_count(config)
    if worker is not None:
        log = logs.get_logger(service="odin", worker=worker.spec.slot)
    else:
        log = logs.get_logger(service="odin")
    log.info(
        "starting",
        version=__version__,
        role="worker" if worker else "supervisor" if workers > 1 else "server",
        workers=worker.spec.count if worker else workers,
        broker=config.broker.kind,
        embedded_nats=config.broker.kind == "nats" and not config.nats.url,
        simulate=config.simulator.enabled,
        config_file=str(run.config_file) if run.config_file else None,
    )
    log.debug("config", **as_dict(config))
    if unknown_env and worker is None:
        log.warning("config_unknown_environment", names=unknown_env)
    demo = getattr(args, "demo", False)
    tty = sys.stdout.isatty()
    page = page_enabled(config)
    announce: Announce | None = (
        partial(print_banner, page=page)
        if demo
        else (partial(print_where_to_connect, page=page) if tty else None)
    )
    try:
        if worker is not None:
            code = trio.run(serve, run, config, log, None, worker)
        elif workers > 1:
            supervisor = Supervisor(
                config, workers, config_file=run.config_file, overrides=run.overrides, log=log
            )
            code = trio.run(supervisor.run, announce)
        else:
            code = trio.run(serve, run, config, log, _single(announce))
    except* (StartError, EmbeddedNatsError, WorkerStartError) as group:
        # One line naming what could not be had (an address, the embedded NATS), never a
        # nursery's traceback.
        log.error("start_failed", error="; ".join(str(exc) for exc in _leaves(group)))
        code = EX_START
    except* Exception as group:
        # A bug: still one JSON line (the traceback in its ``exception`` field), not a dump.
        log.error("crashed", exc_info=group)
        code = EX_START
    log.lifecycle().info("exited", code=code)
    return code


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in a (possibly nested) group: nurseries nest their groups."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def build_broker(config: Config) -> MemoryBroker:
    """The in-process broker, sized by the configuration's history and broker sections."""
    history = config.history
    return MemoryBroker(
        max_messages=history.max_messages,
        max_age=history.max_age,
        max_channels=history.max_channels,
        feed_capacity=config.broker.feed_capacity,
    )


@asynccontextmanager
async def open_broker(config: Config, log: logs.Log) -> AsyncIterator[Broker]:
    """The broker the configuration names, for the duration of the block."""
    if config.broker.kind == "memory":
        yield build_broker(config)
        return
    # Imported here: the NATS bridge brings asyncio, which nothing else may load.
    from odin_fanout.broker.nats import open_nats_broker

    settings = config.nats
    feed = config.broker.feed_capacity
    if settings.url:
        async with open_nats_broker(settings, feed_capacity=feed, log=log) as broker:
            yield broker
        return
    async with run_embedded_nats(
        port=settings.embedded_port,
        data_dir=settings.embedded_data_dir,
        binary=settings.embedded_binary,
        log=log,
    ) as url:
        embedded = attrs.evolve(settings, url=url)
        async with open_nats_broker(embedded, feed_capacity=feed, log=log) as broker:
            yield broker


async def _simulate(run: _Run, broker: Broker, log: logs.Log) -> None:
    """The market simulator, publishing into the broker once it is ready. A reload that
    changes its settings restarts its pacing; the market (every price) carries on."""
    await broker.wait_ready()
    settings = run.config().simulator
    market = Market(
        settings.tokens, settings.events, rng=random.Random(settings.seed), clock=wall_clock
    )
    # Each event carries a message id (as the publisher's do), so a NATS broker retries a
    # publish that a stream leader election or a lost connection left unacknowledged and
    # the stream stores it once.
    instance = secrets.token_hex(4)
    sent = 0

    async def publish(channel: str, payload: bytes) -> None:
        nonlocal sent
        sent += 1
        await broker.publish(channel, payload, msg_id=f"sim-{instance}-{sent}")

    while True:
        settings = run.config().simulator
        market.set_tokens(settings.tokens)
        market.set_events(settings.events)
        with trio.CancelScope() as run.simulator:
            await run_simulator(publish, market, settings.rate, log=log)


Announce = Callable[[Ready, int], None]


def _single(announce: Announce | None) -> Callable[[Listening, Broker], None] | None:
    """A lone server's announcement, from what a worker would report."""
    if announce is None:
        return None
    return lambda listening, broker: announce(Ready(listening, "", broker.status().location), 1)


def print_where_to_connect(ready: Ready, workers: int, *, page: bool = False) -> None:
    """What ``odin serve`` prints on a terminal: where clients and operators connect."""
    http = (ready.listening.ops or ready.listening.http)[0]
    cores = f" with {workers} workers" if workers > 1 else ""
    live = f" Live page at {ready.listening.http[0]}/." if page else ""
    print(
        f"Odin is serving clients at {ready.listening.websocket[0]}{cores} "
        f"(health {http}/health, metrics {http}/metrics).{live} Stop with Ctrl-C.",
        flush=True,
    )


def print_banner(ready: Ready, workers: int, *, page: bool = False) -> None:
    """What ``odin demo`` prints: where to look."""
    websocket = ready.listening.websocket[0]
    http = (ready.listening.ops or ready.listening.http)[0]
    subscribe = """'{"type":"subscribe","data":{"channels":["BTC.*"]}}'"""
    cores = f", {workers} workers" if workers > 1 else ""
    lines = [
        f"Odin demo: simulated market events through an embedded NATS JetStream{cores}.",
        f"  WebSocket  {websocket}",
        f"  Health     {http}/health",
        f"  Metrics    {http}/metrics",
        f"  History    {ready.history}",
        *([f"  Page       {ready.listening.http[0]}/"] if page else []),
        f"Watch:  echo {subscribe} | websocat -n {websocket}",
        "Stop with Ctrl-C.",
    ]
    print("\n".join(lines), flush=True)


@attrs.define
class _Run:
    config_file: Path | None
    overrides: dict[str, object]
    """The command line's settings (or a supervisor's, for a worker): a reload reads the
    file again under the same ones."""
    server: OdinServer | None = None
    forced: bool = False
    simulator: trio.CancelScope | None = None
    """The simulator's pacing loop, cancelled (and restarted) when a reload changes it."""

    def config(self) -> Config:
        assert self.server is not None
        return self.server.context.config

    def load(self) -> tuple[Config, list[str]]:
        config, unknown = load_config(file=self.config_file, overrides=self.overrides)
        try:
            load_keys(config.auth)  # a key that cannot be used is a configuration error
        except (OSError, ValueError) as exc:
            raise ConfigError([str(exc)]) from None
        server_context(config.server)  # so is a certificate that cannot be used (ConfigError)
        return config, unknown

    def reload(self) -> tuple[list[str], list[str]]:
        """Load the configuration again and apply what can change live; raises ConfigError
        (the running configuration is then untouched)."""
        assert self.server is not None
        config, _ = self.load()
        outcome = plan_reload(self.server.context.config, config)
        apply(self.server.context, outcome)
        if self.simulator is not None and any(
            name.startswith("simulator.") for name in outcome.changed
        ):
            self.simulator.cancel()
        self.server.log.lifecycle().info(
            "config_reloaded", changed=outcome.changed, restart_required=outcome.restart_required
        )
        return outcome.changed, outcome.restart_required


async def _watch_signals(run: _Run, everything: trio.CancelScope, log: logs.Log) -> None:
    """First SIGTERM or SIGINT: drain (or, while starting, just stop). Second: stop now.
    SIGHUP: reload the configuration."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                _reload_on_signal(run, log)
            elif run.server is not None and not run.server.stopping:
                log.info("signal", signal=name, action="drain")
                run.server.request_shutdown()
            elif run.server is None:
                log.info("signal", signal=name, action="stop")
                everything.cancel()
            else:
                log.warning("signal", signal=name, action="exit")
                run.forced = True
                everything.cancel()


def _reload_on_signal(run: _Run, log: logs.Log) -> None:
    if run.server is None or run.server.stopping:
        log.info("signal", signal="SIGHUP", action="ignored", why="not serving")
        return
    log.info("signal", signal="SIGHUP", action="reload")
    try:
        run.reload()
    except ConfigError as exc:
        log.warning("config_reload_failed", errors=exc.problems, kept="the running configuration")


# Measured (docs/performance.md): the default threshold (700 allocations) runs the young
# collection for every few connections accepted; at 10,000 connections it took 21-42 % of the
# accept CPU. Objects that live as long as a connection (its session, queue, parser) survive
# a collection anyway, so collecting rarely costs no memory, provided a connection leaves no
# reference cycle behind: the old generations are in practice never collected, so a cycle
# per connection is a leak (wsproto's parser was one: WebSocket.run closes it).
GC_THRESHOLDS = (100_000, 50, 1000)


def tune_gc() -> None:
    """Once the server is up: everything allocated at start-up (modules, configuration, the
    broker) moves out of the collector's sight, and young collections become rare."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    run: _Run,
    config: Config,
    log: logs.Log,
    announce: Callable[[Listening, Broker], None] | None = None,
    worker: WorkerLink | None = None,
) -> int:
    """The server, its broker and the tasks beside it; ``run`` carries what signals and a
    reload need (the settings, the server once it exists); ``worker``, a worker's link to
    its supervisor."""
    metrics = worker.shared_metrics() if worker is not None else Metrics()
    listeners = worker.listeners() if worker is not None else None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, run, nursery.cancel_scope, log)
        async with open_broker(config, log) as broker, trio.open_nursery() as tasks:
            server = run.server = OdinServer(
                config, broker, metrics=metrics, log=log, worker=worker.role if worker else None
            )
            if worker is not None:
                # The port is the host's: while this worker connects to the broker, the others
                # take its share of new clients rather than it hand them a server not ready.
                with trio.move_on_after(WORKER_READY_WAIT):
                    await broker.wait_ready()
            listening = await tasks.start(partial(server.run, listeners=listeners))
            tune_gc()
            control_path = None
            if config.control.enabled:
                control = ControlServer(
                    server, config.control, websocket=listening.websocket, reload=run.reload
                )
                control_path = await tasks.start(control.run)
            if config.simulator.enabled:
                tasks.start_soon(_simulate, run, broker, log)
            if worker is not None:
                worker.report_ready(listening, control_path, broker.status().location)
                tasks.start_soon(_drain_when_orphaned, worker, server, log)
            if announce is not None:
                announce(listening, broker)
            await server.stopped.wait()
            tasks.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    return EX_FORCED if run.forced else 0


async def _drain_when_orphaned(worker: WorkerLink, server: OdinServer, log: logs.Log) -> None:
    """A worker whose supervisor is gone (killed) drains and exits rather than serve on
    unsupervised."""
    await worker.wait_orphaned()
    if not server.stopping:
        log.warning("supervisor_gone", action="drain", supervisor=worker.spec.supervisor_pid)
        server.request_shutdown()

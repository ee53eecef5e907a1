"""``odin`` / ``python -m odin``: the command line, and the only ``trio.run``.

Exit codes: 0 after a clean stop (SIGTERM or SIGINT, drained), 1 on a runtime failure (for
example the port is taken), 2 on a usage error, 78 (EX_CONFIG) on a bad configuration, 130 when
a second signal cuts the drain short.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import orjson
import trio

from odin import __version__, logs
from odin.broker.base import Broker
from odin.broker.embedded import EmbeddedNatsError, run_embedded_nats
from odin.broker.memory import MemoryBroker
from odin.config import Config, ConfigError, as_dict, load_config, set_options
from odin.server.app import Listening, OdinServer
from odin.server.control import ControlServer
from odin.simulator.model import Market
from odin.simulator.runner import run_simulator, wall_clock

EX_CONFIG = 78
EX_FORCED = 130


def _add_common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    command.add_argument("--host", help="address to listen on (server.host)")
    command.add_argument("--port", type=int, help="port, 0 for any free one (server.port)")
    command.add_argument("--rate", type=float, help="simulated events per second (simulator.rate)")
    command.add_argument("--tokens", help="comma-separated symbols (simulator.tokens)")
    command.add_argument("--events", help="comma-separated event types (simulator.events)")
    command.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    command.add_argument("--log-format", choices=["json", "console"])
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
    parser = argparse.ArgumentParser(prog="odin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"odin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the WebSocket fan-out server")
    _add_common(serve)
    serve.add_argument(
        "--broker", choices=["nats", "memory"], help="broker to use (broker.kind; default nats)"
    )
    serve.add_argument("--nats-url", help="NATS server URL; none starts an embedded one (nats.url)")
    serve.add_argument(
        "--simulate", action="store_true", help="publish simulated market events (simulator)"
    )
    demo = commands.add_parser(
        "demo",
        help="an embedded NATS, the price simulator publishing into it, and the server",
    )
    _add_common(demo)
    demo.set_defaults(broker="nats", nats_url=None, simulate=True, demo=True)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides = set_options(args.set)
    flags = {
        "server.host": args.host,
        "server.port": args.port,
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
    args = build_parser().parse_args(argv)
    try:
        config, unknown_env = load_config(file=args.config, overrides=_overrides(args))
    except ConfigError as exc:
        line = {"event": "config_invalid", "level": "error", "errors": exc.problems}
        sys.stderr.write(orjson.dumps(line).decode() + "\n")
        return EX_CONFIG
    if args.check_config:
        sys.stdout.write(orjson.dumps(as_dict(config), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    logs.configure(config.log.level, config.log.format)
    log = logs.get_logger(service="odin")
    log.info("config", version=__version__, **as_dict(config))
    if unknown_env:
        log.warning("config_unknown_environment", names=unknown_env)
    failures: list[BaseException] = []
    announce = _banner if getattr(args, "demo", False) else None
    try:
        code = trio.run(serve, config, log, announce)
    except* (OSError, EmbeddedNatsError) as group:  # e.g. the port is taken: one line
        failures.extend(group.exceptions)
    if failures:
        log.error("start_failed", error="; ".join(str(exc) for exc in failures))
        code = 1
    log.lifecycle().info("exited", code=code)
    return code


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
    from odin.broker.nats import open_nats_broker

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


async def _simulate(config: Config, broker: Broker, log: logs.Log) -> None:
    """The market simulator, publishing into the broker once it is ready."""
    await broker.wait_ready()
    simulator = config.simulator
    market = Market(
        simulator.tokens, simulator.events, rng=random.Random(simulator.seed), clock=wall_clock
    )
    await run_simulator(broker.publish, market, simulator.rate, log=log)


def _banner(listening: Listening, broker: Broker) -> None:
    """What ``odin demo`` prints: where to look."""
    websocket = listening.websocket[0]
    http = listening.http[0]
    subscribe = """'{"type":"subscribe","data":{"channels":["BTC.*"]}}'"""
    lines = [
        "Odin demo: simulated market events through an embedded NATS JetStream.",
        f"  WebSocket  {websocket}",
        f"  Health     {http}/health",
        f"  Metrics    {http}/metrics",
        f"  History    {broker.status().location}",
        f"Watch:  echo {subscribe} | websocat -n {websocket}",
        "Stop with Ctrl-C.",
    ]
    print("\n".join(lines), flush=True)


@attrs.define
class _Run:
    server: OdinServer | None = None
    forced: bool = False


async def _watch_signals(run: _Run, everything: trio.CancelScope, log: logs.Log) -> None:
    """First SIGTERM or SIGINT: drain (or, while starting, just stop). Second: stop now."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if run.server is not None and not run.server.stopping:
                log.info("signal", signal=name, action="drain")
                run.server.request_shutdown()
            elif run.server is None:
                log.info("signal", signal=name, action="stop")
                everything.cancel()
            else:
                log.warning("signal", signal=name, action="exit")
                run.forced = True
                everything.cancel()


Announce = Callable[[Listening, Broker], None]


async def serve(config: Config, log: logs.Log, announce: Announce | None = None) -> int:
    run = _Run()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, run, nursery.cancel_scope, log)
        async with open_broker(config, log) as broker, trio.open_nursery() as tasks:
            server = run.server = OdinServer(config, broker, log=log)
            listening = await tasks.start(server.run)
            if config.control.enabled:
                control = ControlServer(server, config.control, websocket=listening.websocket)
                await tasks.start(control.run)
            if config.simulator.enabled:
                tasks.start_soon(_simulate, config, broker, log)
            if announce is not None:
                announce(listening, broker)
            await server.stopped.wait()
            tasks.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    return EX_FORCED if run.forced else 0

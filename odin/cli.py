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
from collections.abc import Sequence
from pathlib import Path

import orjson
import trio

from odin import __version__, logs
from odin.broker.memory import MemoryBroker
from odin.config import Config, ConfigError, as_dict, load_config
from odin.server.app import OdinServer
from odin.simulator.model import Market
from odin.simulator.runner import run_simulator, wall_clock

EX_CONFIG = 78
EX_FORCED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"odin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the WebSocket fan-out server")
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    serve.add_argument("--host", help="address to listen on (server.host)")
    serve.add_argument("--port", type=int, help="port, 0 for any free one (server.port)")
    serve.add_argument("--broker", choices=["memory"], help="broker to use (broker.kind)")
    serve.add_argument(
        "--simulate", action="store_true", help="publish simulated market events (simulator)"
    )
    serve.add_argument("--rate", type=float, help="simulated events per second (simulator.rate)")
    serve.add_argument("--tokens", help="comma-separated symbols (simulator.tokens)")
    serve.add_argument("--events", help="comma-separated event types (simulator.events)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["json", "console"])
    serve.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set any configuration field, e.g. --set connection.idle_timeout=30s",
    )
    serve.add_argument(
        "--check-config", action="store_true", help="print the effective configuration and exit"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError([f"--set {item}: expected SECTION.FIELD=VALUE"])
        overrides[key.strip()] = value
    flags = {
        "server.host": args.host,
        "server.port": args.port,
        "broker.kind": args.broker,
        "simulator.rate": args.rate,
        "simulator.tokens": args.tokens,
        "simulator.events": args.events,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if args.simulate:
        overrides["simulator.enabled"] = True
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
    try:
        return trio.run(serve, config, log)
    except* OSError as group:  # e.g. the port is taken: one line, no traceback
        failures.extend(group.exceptions)
    log.error("start_failed", error="; ".join(str(exc) for exc in failures))
    return 1


def build_broker(config: Config) -> MemoryBroker:
    """The broker the configuration names, sized by its history and broker sections."""
    history = config.history
    return MemoryBroker(
        max_messages=history.max_messages,
        max_age=history.max_age,
        max_channels=history.max_channels,
        feed_capacity=config.broker.feed_capacity,
    )


async def serve(config: Config, log: logs.Log) -> int:
    broker = build_broker(config)
    server = OdinServer(config, broker, log=log)
    forced = False
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            nonlocal forced
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if not server.stopping:
                        log.info("signal", signal=signal.Signals(signum).name, action="drain")
                        server.request_shutdown()
                    else:
                        log.warning("signal", signal=signal.Signals(signum).name, action="exit")
                        forced = True
                        nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        await nursery.start(server.run)
        if config.simulator.enabled:
            simulator = config.simulator
            rng = random.Random(simulator.seed)
            market = Market(simulator.tokens, simulator.events, rng=rng, clock=wall_clock)
            nursery.start_soon(
                lambda: run_simulator(broker.publish, market, simulator.rate, log=log)
            )
        await server.stopped.wait()
        nursery.cancel_scope.cancel()
    return EX_FORCED if forced else 0

"""``odin-publisher`` / ``python -m publisher``: simulated market events into NATS JetStream,
driven by an HTTP control API.

Exit codes: 0 after SIGTERM or SIGINT, 1 if it cannot start (the port is taken), 2 on a usage
error, 78 on a bad configuration.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework

from odin_fanout import logs
from odin_fanout.broker.nats import open_nats_broker
from odin_fanout.config import as_dict, set_options
from odin_fanout.publisher import metrics
from odin_fanout.publisher.api import build_app
from odin_fanout.publisher.config import PublisherConfig, load
from odin_fanout.publisher.control import Limits
from odin_fanout.publisher.service import PublisherService
from odin_fanout.startup import start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odin-publisher",
        description="Publish simulated market events into NATS JetStream, driven by an HTTP "
        "control API.",
        epilog="Exit codes: 0 after SIGTERM or SIGINT, 1 if it cannot start, 2 on a usage error, "
        "78 on a bad configuration.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument("--host", help="address of the control API (http.host)")
    parser.add_argument("--port", type=int, help="port of the control API, 0 for any (http.port)")
    parser.add_argument("--nats-url", help="NATS server URL(s) (nats.url)")
    parser.add_argument("--rate", type=float, help="events per second (simulation.rate)")
    parser.add_argument("--tokens", help="comma-separated symbols (simulation.tokens)")
    parser.add_argument("--events", help="comma-separated event types (simulation.events)")
    parser.add_argument(
        "--autostart", action="store_true", help="publish at once (simulation.autostart)"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="set any configuration field, e.g. --set simulation.statistics_interval=10s",
    )  # fmt: skip
    parser.add_argument(
        "--check-config", action="store_true", help="print the effective configuration and exit"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides = set_options(args.set)
    flags = {
        "http.host": args.host,
        "http.port": args.port,
        "nats.url": args.nats_url,
        "simulation.rate": args.rate,
        "simulation.tokens": args.tokens,
        "simulation.events": args.events,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if args.autostart:
        overrides["simulation.autostart"] = True
    return overrides


async def serve(
    config: PublisherConfig,
    log: logs.Log,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM or SIGINT (or cancellation): the NATS connection, the service, the
    API. On the way out, publishing stops first and NATS is drained, so what was handed to it
    is flushed."""
    stop = trio.Event()
    async with (
        open_nats_broker(config.nats, feed_capacity=16, log=log, consume=False) as broker,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_watch_signals, stop, log)
        service = PublisherService(config.simulation, broker, log)
        await nursery.start(service.run)
        simulation = config.simulation
        app = build_app(
            service,
            metrics.build_registry(service),
            limits=Limits(simulation.max_rate, simulation.max_tokens),
            cors_origins=config.http.cors_origins,
        )
        http = HypercornConfig()
        http.bind = [f"{config.http.host}:{config.http.port}"]
        http.accesslog = None
        http.errorlog = logging.getLogger("hypercorn.error")
        http.graceful_timeout = 2.0
        binds = await nursery.start(
            functools.partial(
                hypercorn_serve, cast("ASGIFramework", app), http, shutdown_trigger=stop.wait
            )
        )
        log.lifecycle().info("listening", urls=binds)
        task_status.started(binds)
        await stop.wait()
        if service.publishing:
            service.stop()
        nursery.cancel_scope.cancel()


async def _watch_signals(stop: trio.Event, log: logs.Log) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal", signal=signal.Signals(signum).name)
            stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = start(
        functools.partial(load, file=args.config, overrides=_overrides(args)),
        check_config=args.check_config,
    )
    if isinstance(started, int):
        return started
    config, unknown_env = started
    log = logs.get_logger(service="odin-publisher")
    log.info("config", **as_dict(config))
    if unknown_env:
        log.warning("config_unknown_environment", names=unknown_env)
    failures: list[BaseException] = []
    try:
        trio.run(serve, config, log)
    except* OSError as group:  # e.g. the port is taken
        failures.extend(group.exceptions)
    code = 0
    if failures:
        log.error("start_failed", error="; ".join(str(exc) for exc in failures))
        code = 1
    log.lifecycle().info("exited", code=code)
    return code

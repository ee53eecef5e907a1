"""Odin itself, built in-process exactly as ``odin serve`` builds it, with a benchmark publisher.

The server is odin/odin_fanout/cli.py's: default configuration (only host, port and the log level
are set, and ``server.max_connections`` is raised from 10,000 to the process's limit on open files,
so that the idle-memory run can go past 10,000 connections; ``ODIN_*`` variables are ignored so
that runs are reproducible), a ``MemoryBroker`` sized from
the history section, and ``OdinServer.run`` started in the root nursery, with the collector
tuned as ``odin serve`` tunes it. Instead of the market
simulator, a task publishes the benchmark payload (see ``odin_fanout.stress.peers.common``) on
``BENCH.trade`` with ``broker.publish_nowait``, paced like odin/odin_fanout/simulator/runner.py, so
the measured path is the real one: broker -> feed -> pump -> fan-out -> each connection's writer.
Subscribers receive Odin's envelope with the payload as its ``data``.
"""

from __future__ import annotations

import resource

import trio

from odin_fanout import logs
from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.cli import build_broker, tune_gc
from odin_fanout.config import load_config
from odin_fanout.server.app import OdinServer
from odin_fanout.stress.peers.common import (
    CHANNEL,
    Schedule,
    emit,
    parse_args,
    planned,
    read_command,
)


async def publish(broker: MemoryBroker, rate: float, total: int, size: int) -> None:
    schedule = Schedule(trio.current_time(), rate, total)
    sent = 0
    while sent < total:
        target = schedule.due(trio.current_time())
        while sent < target:
            payload = schedule.payload(sent, trio.current_time(), size)
            broker.publish_nowait(CHANNEL, payload)
            sent += 1
        # The simulator awaits publish(), a checkpoint, for every message; sleep_until is one.
        await trio.sleep_until(schedule.next_time(sent))
    schedule.finished(sent, trio.current_time())


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    config, _ = load_config(
        environ={},
        overrides={
            "server.host": args.host,
            "server.port": args.port,
            "server.max_connections": max(10_000, resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
            "log.level": "warning",
        },
    )
    logs.configure(config.log.level, config.log.format)
    log = logs.get_logger(service="odin")
    broker = build_broker(config)
    server = OdinServer(config, broker, log=log)
    with trio.move_on_after(args.max_seconds):
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(server.run)
            tune_gc()  # as odin serve does once it is up
            emit("listening", port=listening.port, server="odin", ws_path=config.server.ws_path)
            while True:
                command = await trio.to_thread.run_sync(read_command, abandon_on_cancel=True)
                if command == "start":
                    rate, total = planned(args)
                    await publish(broker, rate, total, args.payload_size)
                elif command in ("", "stop"):
                    break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)

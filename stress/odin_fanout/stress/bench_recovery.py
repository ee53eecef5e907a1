"""Recovery reads from JetStream: how long a recovery of 100 missed messages takes, and what
CPU it costs, on the Trio direct-get path and on the former nats-py path, beside the
in-memory window.

Usage: ``.venv/bin/python -m odin_fanout.stress.bench_recovery [--channels 100] [--per-channel 300]
[--tries 200] [--missed 100] [--storage file|memory] [--paths trio,nats-py,memory]``

A nats-server (JetStream, a store in a temporary directory) with a stream of ``--channels``
channels of ``--per-channel`` messages each (published round robin, through the broker);
then, for each path, ``--tries`` recoveries one after the other, each through the broker's
``read_after(channel, after, limit=missed)`` as the server's recovery calls it (a random
channel, ``after`` its position ``missed`` messages before its newest, so exactly ``missed``
come back). Reported: p50/p99 latency, Odin's process CPU per recovery (``process_time``),
and nats-server's (``/proc/PID/stat``). ``memory`` is ``MemoryBroker.read_after`` (the
in-memory window) over the same channels. The nats-server is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from odin_fanout.broker.base import HistoryPage
from odin_fanout.broker.embedded import find_binary
from odin_fanout.broker.memory import MemoryBroker
from odin_fanout.broker.nats import NatsBroker, open_nats_broker
from odin_fanout.config import load_config
from odin_fanout.logs import get_logger

_TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _cpu_of(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _payload(channel: int, n: int) -> bytes:
    return b'{"price":%d.25,"qty":0.5,"side":"buy","channel":%d,"n":%d}' % (n, channel, n)


async def _measure(
    name: str,
    read: object,
    targets: list[tuple[str, int]],
    tries: int,
    missed: int,
    nats_pid: int | None,
) -> dict[str, float]:
    rng = random.Random(7)
    latencies = []
    cpu = time.process_time()
    nats_cpu = _cpu_of(nats_pid) if nats_pid else 0.0
    for _ in range(tries):
        channel, after = rng.choice(targets)
        started = time.perf_counter()
        page: HistoryPage = await read(channel, after, missed)  # type: ignore[operator]
        latencies.append(time.perf_counter() - started)
        assert len(page.messages) == missed, (name, len(page.messages))
    cpu = time.process_time() - cpu
    nats_cpu = (_cpu_of(nats_pid) - nats_cpu) if nats_pid else 0.0
    result = {
        "p50_ms": _percentile(latencies, 0.5) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "cpu_ms": cpu / tries * 1000,
        "nats_cpu_ms": nats_cpu / tries * 1000,
    }
    print(
        f"{name:>8}: p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
        f"Odin CPU {result['cpu_ms']:5.2f} ms/recovery"
        + (f"  nats-server CPU {result['nats_cpu_ms']:5.2f} ms/recovery" if nats_pid else ""),
        flush=True,
    )
    return result


async def _on_nats(args: argparse.Namespace, url: str, nats_pid: int) -> None:
    config, _ = load_config(
        environ={},
        overrides={"broker.kind": "nats", "nats.url": url, "nats.storage": args.storage},
    )
    log = get_logger(service="bench-recovery")
    async with open_nats_broker(config.nats, feed_capacity=100_000, log=log) as broker:
        await broker.wait_ready()
        channels = [f"B{c}.trade" for c in range(args.channels)]
        for n in range(args.per_channel):
            for c, channel in enumerate(channels):
                await broker.publish(channel, _payload(c, n))
            if n % 10 == 9:
                await broker.drain()  # within the publisher's queue
        await broker.drain()
        total = args.channels * args.per_channel
        with trio.fail_after(60):
            while broker.stats().ingested < total:  # noqa: ASYNC110 (a counter, no event)
                await trio.sleep(0.05)
        # A channel's position ``missed`` messages before its newest: the stream is round robin.
        targets = [
            (channel, (args.per_channel - args.missed - 1) * args.channels + c + 1)
            for c, channel in enumerate(channels)
        ]
        for path in args.paths:
            if path == "memory":
                continue
            broker.trio_reads = path == "trio"
            await _warm(broker, targets, args.missed)
            await _measure(path, broker.read_after, targets, args.tries, args.missed, nats_pid)


async def _warm(broker: NatsBroker, targets: list[tuple[str, int]], missed: int) -> None:
    for channel, after in targets[:10]:
        await broker.read_after(channel, after, missed)


async def _on_memory(args: argparse.Namespace) -> None:
    broker = MemoryBroker(max_messages=args.per_channel, max_channels=args.channels + 10)
    channels = [f"B{c}.trade" for c in range(args.channels)]
    for n in range(args.per_channel):
        for c, channel in enumerate(channels):
            broker.publish_nowait(channel, _payload(c, n))
    targets = [
        (channel, (args.per_channel - args.missed - 1) * args.channels + c + 1)
        for c, channel in enumerate(channels)
    ]
    await _measure("memory", broker.read_after, targets, args.tries, args.missed, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--per-channel", type=int, default=300)
    parser.add_argument("--tries", type=int, default=200)
    parser.add_argument("--missed", type=int, default=100)
    parser.add_argument("--storage", choices=("file", "memory"), default="file")
    parser.add_argument(
        "--paths", type=lambda text: text.split(","), default=["trio", "nats-py", "memory"]
    )
    args = parser.parse_args()
    assert args.per_channel > args.missed
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; {args.channels} channels x {args.per_channel}, "
        f"{args.storage} storage, {args.tries} recoveries of {args.missed}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as directory:
        port = _free_port()
        log = Path(directory, "nats.log").open("wb")  # noqa: SIM115 (closed below)
        server = subprocess.Popen(
            [find_binary(""), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", directory],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("nats-server did not start") from None
                    time.sleep(0.05)
            trio.run(_on_nats, args, f"nats://127.0.0.1:{port}", server.pid)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
    if "memory" in args.paths:
        trio.run(_on_memory, args)


if __name__ == "__main__":
    main()

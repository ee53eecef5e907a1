"""Server-Sent Events beside WebSocket: the server CPU one delivery costs on each transport.

One ``odin serve --broker memory`` process; N clients of one transport subscribe to
``BTC.trade`` (raw sockets: a masked subscribe frame for WebSocket, ``GET /sse`` for SSE);
bursts of events are published through ``POST /api/publish``; each client reads (and drops)
bytes until the burst's last event has arrived. CPU is the server's utime + stime from /proc
over the bursts; "µs / delivery" is that over N x events. Figures: docs/performance.md.

    flock /tmp/odin-heavy.lock .venv/bin/python -m odin_fanout.stress.bench_sse --clients 1000
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time

import trio

from odin_fanout.stress.procstat import proc_cpu_seconds

KEY = "bench-sse-publish-key-0123456789"


def masked_text(payload: bytes) -> bytes:
    """A client's text frame (clients must mask; a zero mask keeps the bytes readable)."""
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def open_client(port: int, transport: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if transport == "sse":
        await stream.send_all(b"GET /sse?channels=BTC.trade HTTP/1.1\r\nHost: x\r\n\r\n")
        marker = b"subscription_ack"
    else:
        key = base64.b64encode(os.urandom(16))
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        await read_until(stream, b"\r\n\r\n")
        subscribe = {"type": "subscribe", "data": {"channels": ["BTC.trade"]}}
        await stream.send_all(masked_text(json.dumps(subscribe).encode()))
        marker = b"subscription_ack"
    await read_until(stream, marker)
    return stream


async def read_until(stream: trio.SocketStream, marker: bytes) -> None:
    tail = b""
    while marker not in tail:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed")
        tail = tail[-len(marker) :] + data


async def publish_burst(port: int, events: int, burst: int) -> None:
    """``events`` events in requests of 100 (one connection each: answers close it), the
    last one marked."""
    for start in range(0, events, 100):
        batch: list[dict[str, object]] = [
            {"channel": "BTC.trade", "data": {"price": 1.5, "n": n, "burst": burst}}
            for n in range(start, min(events, start + 100))
        ]
        if start + 100 >= events:
            batch[-1]["data"] = {"price": 1.5, "end": f"end-{burst}"}
        body = json.dumps({"events": batch}).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await read_until(stream, b"published")


async def measure(port: int, pid: int, transport: str, clients: int, events: int,
                  bursts: int) -> dict[str, float]:  # fmt: skip
    streams = []
    for _ in range(clients):
        streams.append(await open_client(port, transport))
    before = proc_cpu_seconds(pid)
    began = time.monotonic()
    for burst in range(bursts):
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(read_until, stream, f"end-{burst}".encode())
            nursery.start_soon(publish_burst, port, events, burst)
    elapsed = time.monotonic() - began
    used = proc_cpu_seconds(pid) - before
    for stream in streams:
        await stream.aclose()
    deliveries = clients * events * bursts
    return {
        "deliveries": deliveries,
        "seconds": round(elapsed, 2),
        "deliveries_per_s": round(deliveries / elapsed),
        "cpu_s": round(used, 3),
        "us_per_delivery": round(1e6 * used / deliveries, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=500, help="events per burst")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "odin_fanout", "serve", "--broker", "memory", "--port", "0",
               "--workers", "1", "--log-level", "warning",
               "--set", "publish.enabled=true", "--set", f"publish.api_keys={KEY}",
               "--set", "publish.rate_per_second=0", "--set", "publish.max_batch=100",
               "--set", "connection.queue_max_messages=4096",
               "--set", "connection.queue_max_bytes=16777216"]  # fmt: skip
    results: list[dict[str, object]] = []
    for repeat in range(args.repeats):
        for transport in ("websocket", "sse"):
            port = _free_port()
            server = subprocess.Popen([*command[:7], str(port), *command[8:]])
            try:
                trio.run(_wait_port, port)
                row = trio.run(measure, port, server.pid, transport, args.clients,
                               args.events, args.bursts)  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=30)
            record = {"transport": transport, "repeat": repeat, "clients": args.clients, **row}
            print(json.dumps(record), flush=True)
            results.append(record)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _wait_port(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


if __name__ == "__main__":
    raise SystemExit(main())

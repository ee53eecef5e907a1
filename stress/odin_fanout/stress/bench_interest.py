"""Interest-based ingest: what NATS sends an Odin process, and what ingesting it costs, when its
clients want 1 %, 10 % or 100 % of the channels, with ``broker.interest = "subscribed"`` beside
``broker.interest = "all"`` (every process consumes every subject, as before).

Usage: ``.venv/bin/python -m odin_fanout.stress.bench_interest [--channels 1000] [--rate 5000]
[--duration 10] [--fractions 0.01,0.1,1] [--modes subscribed,all] [--clients 4]
[--per-client 100] [--latency-samples 50]``

One nats-server (JetStream, a store in a temporary directory, HTTP monitoring on) serves every
configuration. For each mode and fraction, one ``odin serve --workers 1`` process is started
on it; WebSocket clients (``--clients``, more if the channels wanted exceed ``--per-client``
each: the server's default limit is 128 subscriptions per connection) subscribe together to the
first ``fraction × channels`` channels (``T0000.trade``, ``T0001.trade`` …) and wait for their
acks. A publisher process (nats-py, core publishes with a reply inbox for the JetStream acks)
then publishes ``rate`` events a second round robin over *all* the channels for ``duration``
seconds. Measured from just before the first publish until the clients have received what
they will (at most 5 s after the last publish):

* NATS → Odin: the delta of ``out_msgs`` / ``out_bytes`` of Odin's connections (their names
  start with ``odin``) in the nats-server's ``/connz``;
* Odin's CPU: the delta of utime + stime of its PID (``/proc/PID/stat``), as a percentage of
  one core over the window and in µs per published event;
* the events the clients received (beside the number published on the channels they want);
* then, the publisher stopped, how long a subscribe to a channel nobody wanted yet takes to
  be acknowledged (``--latency-samples`` channels, one at a time): with interest, each
  changes the consumer's filters first.

Odin is stopped by its PID (SIGTERM, then SIGKILL) after each configuration, the nats-server
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from odin_fanout.broker.embedded import find_binary
from odin_fanout.stress.bench_ingest import _metrics
from odin_fanout.stress.bench_recovery import _free_port
from odin_fanout.stress.bench_workers import Service
from odin_fanout.stress.procstat import proc_cpu_seconds as _cpu_seconds

_NAME = "bench-interest-publisher"


def _channel(index: int) -> str:
    return f"T{index:04d}.trade"


# ---- the publisher (its own process: ``--publish URL``) ------------------------------------


async def _publish(url: str, rate: float, duration: float, channels: int) -> dict[str, float]:
    """Publish ``rate × duration`` events round robin over ``channels`` channels, in ticks of
    10 ms, each with a reply subject for its JetStream ack; count the acks at the end."""
    import nats
    from nats.aio.msg import Msg

    nc = await nats.connect(url, name=_NAME)
    acks = {"ok": 0, "error": 0}

    total = round(rate * duration)
    all_acked = asyncio.Event()

    async def on_ack(message: Msg) -> None:
        acks["error" if b'"error"' in message.data else "ok"] += 1
        if acks["ok"] + acks["error"] >= total:
            all_acked.set()

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=on_ack)
    subjects = [f"odin.token.{_channel(i).split('.')[0]}.trade" for i in range(channels)]
    bodies = [
        json.dumps({"type": "price:update", "tokenId": subject.split(".")[2], "price": 1.5,
                    "volume24h": 124174711, "source": "bench"}).encode()
        for subject in subjects
    ]  # fmt: skip
    tick = 0.01
    started = time.monotonic()
    sent = 0
    while sent < total:
        elapsed = time.monotonic() - started
        target = min(total, math.ceil(rate * (elapsed + tick)))
        for n in range(sent, target):
            await nc.publish(subjects[n % channels], bodies[n % channels], reply=inbox)
        sent = max(sent, target)
        await asyncio.sleep(max(0.0, started + (math.floor(elapsed / tick) + 1) * tick
                                - time.monotonic()))  # fmt: skip
    await nc.flush()
    seconds = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_acked.wait(), timeout=10)
    await nc.close()
    return {"sent": sent, "seconds": seconds, "acked": acks["ok"], "ack_errors": acks["error"]}


# ---- the nats-server --------------------------------------------------------------------------


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@contextmanager
def _nats_server(directory: str) -> Iterator[tuple[str, int, int]]:
    """A nats-server on 127.0.0.1 (JetStream, monitoring): its URL, monitoring port, PID."""
    port, monitor = _free_port(), _free_port()
    with Path(directory, "nats.log").open("wb") as log:
        server = subprocess.Popen(
            [find_binary(""), "-js", "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor),
             "-sd", str(Path(directory, "store"))],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:  # healthy: listening, and JetStream up
                try:
                    if _get_json(f"http://127.0.0.1:{monitor}/healthz").get("status") == "ok":
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("nats-server did not start")
                time.sleep(0.05)
            yield f"nats://127.0.0.1:{port}", monitor, server.pid
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _odin_egress(monitor: int) -> dict[int, tuple[str, int, int]]:
    """Name, messages and bytes the nats-server sent each of Odin's connections so far, by
    connection id."""
    connz = _get_json(f"http://127.0.0.1:{monitor}/connz?subs=0&limit=4096")
    return {
        conn["cid"]: (conn["name"], conn["out_msgs"], conn["out_bytes"])
        for conn in connz.get("connections", [])
        if str(conn.get("name", "")).startswith("odin")
    }


# ---- one configuration --------------------------------------------------------------------


@attrs.define
class Snapshot:
    egress: dict[int, tuple[str, int, int]]
    cpu: float
    metrics: dict[str, float]
    delivered: int
    at: float


@attrs.define
class Clients:
    """What the WebSocket clients received, all together."""

    events: int = 0
    gaps: int = 0
    other: dict[str, int] = attrs.Factory(dict)


async def _client(url: str, channels: list[str], clients: Clients, subscribed: trio.Event) -> None:
    async with open_websocket_url(url, max_message_size=1 << 22) as ws:
        await ws.send_message(
            json.dumps({"type": "subscribe", "id": 1, "data": {"channels": channels}})
        )
        while True:
            reply = json.loads(await ws.get_message())
            if reply.get("type") == "subscription_ack":
                if reply.get("count") != len(channels):
                    raise RuntimeError(f"subscribed to {reply.get('count')} of {len(channels)}")
                break
            if reply.get("type") == "error":
                raise RuntimeError(f"subscribe refused: {reply}")
        subscribed.set()
        try:
            while True:
                message = json.loads(await ws.get_message())
                if "seq" in message and "channel" in message:
                    clients.events += 1
                elif message.get("type") == "gap":
                    clients.gaps += 1
                else:
                    kind = str(message.get("type"))
                    clients.other[kind] = clients.other.get(kind, 0) + 1
        except ConnectionClosed:
            return


def _snapshot(monitor: int, pid: int, metrics_port: int, clients: Clients) -> Snapshot:
    return Snapshot(
        egress=_odin_egress(monitor),
        cpu=_cpu_seconds(pid),
        metrics=_metrics(metrics_port),
        delivered=clients.events,
        at=time.monotonic(),
    )


def _expected(sent: int, channels: int, wanted: int) -> int:
    """Events of the first ``wanted`` channels among ``sent`` published round robin."""
    full, rest = divmod(sent, channels)
    return full * wanted + min(wanted, rest)


async def _measure(
    args: argparse.Namespace, url: str, monitor: int, odin: Service, ws_url: str, port: int,
    fraction: float,
) -> dict[str, Any]:  # fmt: skip
    wanted = max(1, round(fraction * args.channels))
    channels = [_channel(i) for i in range(wanted)]
    count = max(args.clients, math.ceil(wanted / args.per_client))
    clients = Clients()
    async with trio.open_nursery() as nursery:
        subscribed = [trio.Event() for _ in range(count)]
        with trio.fail_after(60):
            for i, event in enumerate(subscribed):
                share = channels[i::count]
                if share:
                    nursery.start_soon(_client, ws_url, share, clients, event)
                else:
                    event.set()
            for event in subscribed:
                await event.wait()
        await trio.sleep(1.0)  # the consumer with the new filters is delivering
        before = await trio.to_thread.run_sync(_snapshot, monitor, odin.pid, port, clients)
        command = [sys.executable, "-m", "odin_fanout.stress.bench_interest", "--publish", url,
                   "--rate", str(args.rate), "--duration", str(args.duration),
                   "--channels", str(args.channels)]  # fmt: skip
        with trio.fail_after(args.duration * 3 + 30):
            done = await trio.run_process(command, capture_stdout=True)
        published = json.loads(done.stdout)
        expected = _expected(published["sent"], args.channels, wanted)
        last, still = clients.events, time.monotonic()
        with trio.move_on_after(5):
            while clients.events - before.delivered < expected:
                await trio.sleep(0.05)
                if clients.events != last:
                    last, still = clients.events, time.monotonic()
                elif time.monotonic() - still > 1.0:
                    break
        after = await trio.to_thread.run_sync(_snapshot, monitor, odin.pid, port, clients)
        latencies = await _subscribe_latency(ws_url, args.latency_samples)
        nursery.cancel_scope.cancel()
    by_name: dict[str, list[int]] = {}
    for cid, (name, msgs, size) in after.egress.items():
        _, msgs_before, size_before = before.egress.get(cid, (name, 0, 0))
        counts = by_name.setdefault(name, [0, 0])
        counts[0] += msgs - msgs_before
        counts[1] += size - size_before
    out_msgs = sum(counts[0] for counts in by_name.values())
    out_bytes = sum(counts[1] for counts in by_name.values())
    cpu = after.cpu - before.cpu
    window = after.at - before.at
    return {
        "wanted": wanted,
        "clients": count,
        "published": published["sent"],
        "publish_seconds": published["seconds"],
        "acked": published["acked"],
        "ack_errors": published["ack_errors"],
        "out_msgs": out_msgs,
        "out_bytes": out_bytes,
        "cpu_pct": 100 * cpu / window,
        "cpu_us_per_event": 1e6 * cpu / max(1, published["sent"]),
        "window": window,
        "delivered": after.delivered - before.delivered,
        "expected": expected,
        "gaps": clients.gaps,
        "other": dict(clients.other),
        "ingested": after.metrics.get("odin_broker_ingested_total", 0.0)
        - before.metrics.get("odin_broker_ingested_total", 0.0),
        "interest_changes": after.metrics.get("odin_interest_changes_total", 0.0),
        "filters": after.metrics.get("odin_interest_filters", 0.0),
        "connections": len(after.egress),
        "egress_by_connection": by_name,
        "subscribe_ms": _percentiles(latencies),
    }


async def _subscribe_latency(url: str, samples: int) -> list[float]:
    """Milliseconds from a subscribe to its ack, for ``samples`` channels nobody wanted yet,
    one at a time on one connection (after the publisher stopped): with interest each one
    changes the consumer's filters before its ack."""
    latencies = []
    async with open_websocket_url(url) as ws:
        for n in range(samples):
            started = time.perf_counter()
            await ws.send_message(json.dumps(
                {"type": "subscribe", "id": n, "data": {"channels": [f"L{n:04d}.trade"]}}
            ))  # fmt: skip
            with trio.fail_after(10):
                while json.loads(await ws.get_message()).get("type") != "subscription_ack":
                    pass
            latencies.append(1000 * (time.perf_counter() - started))
    return latencies


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(ordered[len(ordered) // 2], 2),
        "p99": round(ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)], 2),
    }


def _records(odin: Service) -> list[dict[str, Any]]:
    """Odin's JSON log records so far; a line that is not JSON is reported, under ``text``."""
    records = []
    for line in odin.lines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"event": "text", "level": "warning", "text": line})
    return records


def _wait_event(odin: Service, event: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in _records(odin):
            if record.get("event") == event:
                return record
        if odin.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no {event!r} from odin: {odin.lines()[-20:]}")


def _run(args: argparse.Namespace, url: str, monitor: int, mode: str, fraction: float) -> Any:
    command = ["serve", "--port", "0", "--workers", "1", "--broker", "nats", "--nats-url", url,
               "--set", f"broker.interest={mode}"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-interest-odin-") as logdir:
        odin = Service("odin", [sys.executable, "-m", "odin_fanout", *command], Path(logdir))
        try:
            return _measure_odin(args, url, monitor, odin, fraction)
        finally:
            odin.stop(15)


def _measure_odin(
    args: argparse.Namespace, url: str, monitor: int, odin: Service, fraction: float
) -> Any:
    listening = _wait_event(odin, "listening")
    _wait_event(odin, "broker_ready")
    ws_url: str = listening["websocket"][0]
    port = int(ws_url.rsplit(":", 1)[1].split("/", 1)[0])
    result: dict[str, Any] = trio.run(_measure, args, url, monitor, odin, ws_url, port, fraction)
    records = _records(odin)
    result["text_lines"] = [r["text"] for r in records if r["event"] == "text"]
    result["log"] = sorted(
        {
            str(record.get("event"))
            for record in records
            if record.get("level") in ("warning", "error", "critical")
            or "consumer" in str(record.get("event"))
            or "interest" in str(record.get("event"))
        }
    )
    result["exit"] = odin.stop(15)  # SIGTERM: a drain, then exit 0
    return result


# ---- the report -------------------------------------------------------------------------------


def _table(rows: list[tuple[str, float, dict[str, Any]]]) -> str:
    lines = [
        "| mode | wanted % | events published | NATS→Odin msgs | NATS→Odin MB | Odin CPU % "
        "| Odin CPU µs/event | delivered to clients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, fraction, r in rows:
        lines.append(
            f"| {mode} | {100 * fraction:g} | {r['published']:,} | {r['out_msgs']:,} "
            f"| {r['out_bytes'] / 1e6:.2f} | {r['cpu_pct']:.1f} | {r['cpu_us_per_event']:.1f} "
            f"| {r['delivered']:,} of {r['expected']:,} |"
        )
    return "\n".join(lines)


def _details(rows: list[tuple[str, float, dict[str, Any]]]) -> str:
    lines = [
        "| mode | wanted % | channels / clients | publisher rate /s | acked | Odin ingested "
        "| filters | interest changes | NATS→Odin msgs by connection | window s | gaps "
        "| subscribe to a new channel p50 / p99 ms | Odin log (warnings, consumer, interest) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for mode, fraction, r in rows:
        egress = sorted(r["egress_by_connection"].items())
        by_connection = ", ".join(f"{name} {counts[0]:,}" for name, counts in egress if counts[0])
        lines.append(
            f"| {mode} | {100 * fraction:g} | {r['wanted']} / {r['clients']} "
            f"| {r['published'] / r['publish_seconds']:,.0f} | {r['acked']:,} "
            f"| {r['ingested']:,.0f} | {r['filters']:g} | {r['interest_changes']:g} "
            f"| {by_connection} | {r['window']:.1f} | {r['gaps']} "
            f"| {r['subscribe_ms'].get('p50', 0):.2f} / {r['subscribe_ms'].get('p99', 0):.2f} "
            f"| {', '.join(r['log']) or '-'} |"
        )
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--fractions", type=_floats, default=[0.01, 0.1, 1.0])
    parser.add_argument("--modes", type=lambda t: t.split(","), default=["subscribed", "all"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--publish", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        result = asyncio.run(_publish(args.publish, args.rate, args.duration, args.channels))
        print(json.dumps(result), flush=True)
        return
    print(f"`{shlex.join([Path(sys.executable).name, '-m', __spec__.name, *sys.argv[1:]])}`")
    print(
        f"\n{platform.node()}: {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, "
        f"{platform.platform()}, Python {platform.python_version()}; {args.channels} channels, "
        f"{args.rate:g} events/s for {args.duration:g} s\n",
        flush=True,
    )
    rows: list[tuple[str, float, dict[str, Any]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-interest-") as directory,
        _nats_server(directory) as (url, monitor, _pid),
    ):
        for mode in args.modes:
            for fraction in args.fractions:
                result = _run(args, url, monitor, mode, fraction)
                rows.append((mode, fraction, result))
                print(f"{mode} {100 * fraction:g} %: {json.dumps(result)}", flush=True)
    print()
    print(_table(rows))
    print()
    print(_details(rows))


if __name__ == "__main__":
    main()

"""Publisher rate benchmark: how close ``odin-publisher`` comes to the rate it is asked for.

A nats-server (JetStream, memory storage) runs on CPU 1; the target alone on CPU 0: either
``python -m publisher``, started through its control API with a ``duration``, or the peer
``stress/odin_fanout/stress/peers/natspy_publisher.py`` (the same events and pacing, published with
nats-py on plain asyncio). When publishing has stopped the driver reads the stream back: how many
events were stored, and their JetStream timestamps. It reports

* ``count_error_pct``: stored ÷ (rate × duration) − 1 (the duration is the publisher's own
  timer, so this is what a user sees);
* ``achieved_per_s``: (stored − 1) ÷ (last timestamp − first timestamp);
* ``worst_second_pct``: the largest deviation of any whole second's count from the rate
  (evenness; only for rates of 10/s and more);
* the publisher's CPU per event and its ``failed`` and ``skipped`` counters.

    .venv/bin/python -m odin_fanout.stress.bench_publisher --rates 1,10,100,1000,5000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from odin_fanout.stress.bench_ingest import _pin, _stop, _wait_line
from odin_fanout.stress.procstat import proc_cpu_seconds as _cpu_seconds


def _http(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def _stored(url: str) -> list[float]:
    """The JetStream timestamps (Unix seconds) of every stored event, in order (read with an
    ordered consumer: one request per message would take minutes at 100k events)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        total = (await js.stream_info("ODIN_TOKENS")).state.messages
        stamps: list[float] = []
        done = asyncio.Event()

        async def collect(message: Msg) -> None:
            stamps.append(message.metadata.timestamp.timestamp())
            if len(stamps) >= total:
                done.set()

        if total:
            await js.subscribe(
                "odin.token.>", stream="ODIN_TOKENS", cb=collect, ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )  # fmt: skip
            await asyncio.wait_for(done.wait(), timeout=120)
        return stamps
    finally:
        await nc.close()


def _run_publisher(url: str, rate: float, duration: float) -> tuple[float, dict[str, int]]:
    """``odin-publisher`` on CPU 0, driven through its API; its CPU seconds and counters."""
    publisher = subprocess.Popen(
        [*_pin(0), sys.executable, "-m", "odin_fanout.publisher", "--port", "0", "--nats-url", url,
         "--set", "nats.storage=memory", "--set", "simulation.max_rate=1000000",
         # Keep every event (the default keeps 10,000 per channel), as the peer's stream does.
         "--set", "nats.max_msgs_per_subject=10000000",
         "--log-level", "warning"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert publisher.stderr is not None
        port = int(_wait_line(publisher.stderr, r'"event":"listening".*?:(\d+)"', 30)[1])
        deadline = time.monotonic() + 30
        while _http(port, "GET", "/health")["nats"] != "connected":
            if time.monotonic() > deadline:
                raise RuntimeError("the publisher did not connect")
            time.sleep(0.05)
        cpu_before = _cpu_seconds(publisher.pid)
        start = {"action": "start", "messagesPerSecond": rate, "duration": int(duration * 1000)}
        _http(port, "POST", "/control", start)
        time.sleep(duration)
        while _http(port, "GET", "/stats")["isPublishing"]:
            time.sleep(0.05)
        time.sleep(0.5)  # the last acknowledgements
        stats = _http(port, "GET", "/stats")["stats"]
        cpu = _cpu_seconds(publisher.pid) - cpu_before
    finally:
        _stop(publisher)
    counters = {"acknowledged": stats["messagesPublished"], "failed": stats["errors"],
                "skipped": stats["skipped"]}  # fmt: skip
    return cpu, counters


def _run_peer(url: str, rate: float, duration: float) -> tuple[float, dict[str, int]]:
    """The nats-py peer on CPU 0; its CPU seconds from its first publish to its last ack."""
    peer = subprocess.Popen(
        [*_pin(0), sys.executable, "-m", "odin_fanout.stress.peers.natspy_publisher", url,
         str(rate), str(duration)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert peer.stdout is not None
        _wait_line(peer.stdout, r'"ready"', 30)
        cpu_before = _cpu_seconds(peer.pid)
        line = _wait_line(peer.stdout, r'"sent"', duration * 4 + 60)
        cpu = _cpu_seconds(peer.pid) - cpu_before
    finally:
        _stop(peer)
    return cpu, {"acknowledged": json.loads(line.string)["sent"], "failed": 0, "skipped": 0}


def run(target: str, rate: float, duration: float, workdir: Path) -> dict[str, Any]:
    nats_server = shutil.which("nats-server") or str(Path(sys.executable).with_name("nats-server"))
    nats_proc = subprocess.Popen(
        [*_pin(1), nats_server, "-js", "-a", "127.0.0.1", "-p", "-1",
         "-sd", str(workdir / f"store-{target}-{rate:g}")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert nats_proc.stderr is not None
        nats_port = int(_wait_line(nats_proc.stderr, r"client connections on .+:(\d+)", 20)[1])
        url = f"nats://127.0.0.1:{nats_port}"
        runner = _run_publisher if target == "odin-publisher" else _run_peer
        cpu, counters = runner(url, rate, duration)
        stamps = asyncio.run(_stored(url))
    finally:
        _stop(nats_proc)
    stored = len(stamps)
    span = stamps[-1] - stamps[0] if stored > 1 else 0.0
    result: dict[str, Any] = {
        "target": target,
        "rate": rate,
        "duration_s": duration,
        "stored": stored,
        "expected": round(rate * duration),
        "count_error_pct": round(100 * (stored / (rate * duration) - 1), 2),
        "achieved_per_s": round((stored - 1) / span, 2) if span else None,
        **counters,
        "cpu_pct": round(100 * cpu / duration, 1),
        "cpu_us_per_event": round(1e6 * cpu / max(stored, 1), 1),
    }
    if rate >= 10 and stored > 1:
        seconds = Counter(int(stamp - stamps[0]) for stamp in stamps)
        whole = [seconds[i] for i in range(int(span))]  # complete seconds only
        if whole:
            result["worst_second_pct"] = round(
                100 * max(abs(count - rate) for count in whole) / rate, 1
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,10,100,1000,5000,10000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--min-events", type=int, default=30, help="run slow rates long enough for this many"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--targets", default="odin-publisher,natspy")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="odin-publisher-bench-") as workdir:
        for repeat in range(args.repeats):
            for rate in (float(r) for r in args.rates.split(",")):
                duration = max(args.duration, args.min_events / rate)
                for target in args.targets.split(","):
                    result = run(target, rate, duration, Path(workdir) / f"run{repeat}")
                    result["repeat"] = repeat + 1
                    results.append(result)
                    print(json.dumps(result), flush=True)
    if args.json:
        machine = {"nproc": os.cpu_count(), "python": sys.version.split()[0],
                   "kernel": os.uname().release}  # fmt: skip
        args.json.write_text(json.dumps({"machine": machine, "runs": results}, indent=1))


if __name__ == "__main__":
    main()

"""NATS ingest benchmark: how many messages per second Odin takes from JetStream into its
fan-out on one core.

A nats-server (JetStream, memory storage) and a plain NATS publisher share CPU 1; one
``odin serve`` process runs alone on CPU 0. The publisher publishes at a fixed rate for a fixed
time on 20 channels; Odin's own counters (``/metrics``) say how many it ingested, how far
behind it fell (``odin_broker_pending_messages``) and whether its feed dropped any. The
ingest rate is the messages published ÷ the time from the first publish to Odin's last
ingest, so an Odin that falls behind and catches up later is measured as slower.

    .venv/bin/python -m odin_fanout.stress.bench_ingest --rates 20000,50000,70000 --duration 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from odin_fanout.stress.procstat import cpu_busy_s as _cpu_busy
from odin_fanout.stress.procstat import proc_cpu_seconds as _cpu_seconds

PUBLISHER = r"""
import asyncio, json, sys, time
import nats

async def main(url: str, rate: float, duration: float) -> None:
    nc = await nats.connect(url)
    total = int(rate * duration)
    body = json.dumps({"type": "price:update", "tokenId": "X", "price": 1.0,
                       "pad": "x" * 40}).encode()
    began = time.time()
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            await nc.publish(f"odin.token.S{sent % 20}.trade", body)
            sent += 1
        await nc.flush()
        await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    seconds = time.monotonic() - start
    print(json.dumps({"sent": sent, "seconds": seconds, "began": began}), flush=True)
    await nc.close()

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
"""

_METRIC = re.compile(r"^(odin_[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.MULTILINE)


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for name, value in _METRIC.findall(text):
        values[name] = values.get(name, 0.0) + float(value)
    return values


def _wait_line(stream: Any, pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        if match := re.search(pattern, line):
            return match
    raise RuntimeError(f"no line matching {pattern!r}")


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Target:
    """What is measured: started pinned to CPU 0, read back through its own counters."""

    def __init__(self, name: str, url: str, workdir: Path) -> None:
        self.name = name
        self._port = 0
        self._last: dict[str, float] = {"ingested": 0.0, "pending": 0.0, "dropped": 0.0}
        self.warnings: list[str] = []
        """Events Odin logged as warnings or errors, and consumer restarts, during the run."""
        if name == "odin":
            command = [sys.executable, "-m", "odin_fanout", "serve", "--port", "0",
                       "--broker", "nats", "--nats-url", url, "--set", "nats.storage=memory",
                       "--set", "broker.feed_capacity=100000"]  # fmt: skip
        else:
            mode = name.removeprefix("natspy-")
            command = [sys.executable, "-m", "odin_fanout.stress.peers.nats_ingest", "--url", url,
                       "--mode", "trio-asyncio" if mode == "trio" else mode]  # fmt: skip
        self.process = subprocess.Popen(
            [*_pin(0), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "XDG_STATE_HOME": str(workdir)},
        )  # fmt: skip
        stdout, stderr = self.process.stdout, self.process.stderr
        assert stdout is not None
        assert stderr is not None
        if name == "odin":
            line = _wait_line(stderr, r'"event":"listening".*?:(\d+)/ws', 30)
            self._port = int(line.group(1))
            _wait_line(stderr, r'"event":"broker_ready"', 30)
        else:
            _wait_line(stdout, r'"ready"', 30)
        # Keep reading both pipes, so that a process that writes more never blocks on them.
        threading.Thread(target=self._follow, args=(stdout,), daemon=True).start()
        threading.Thread(target=self._follow, args=(stderr,), daemon=True).start()

    def _follow(self, pipe: Any) -> None:
        for line in pipe:
            if self.name != "odin" and line.startswith('{"ingested"'):
                self._last = json.loads(line)
            elif '"level":"warning"' in line or '"level":"error"' in line or "consumer" in line:
                self.warnings.append(json.loads(line).get("event", line[:80]))

    def counts(self) -> dict[str, float]:
        """Messages ingested, pending in the stream, dropped by the process, so far."""
        if self.name != "odin":
            return dict(self._last)
        values = _metrics(self._port)
        return {
            "ingested": values["odin_broker_ingested_total"],
            "pending": values.get("odin_broker_pending_messages", 0.0),
            "dropped": values["odin_broker_ingest_dropped_total"],
        }


def run(target_name: str, rate: float, duration: float, workdir: Path) -> dict[str, Any]:
    nats_server = shutil.which("nats-server") or str(Path(sys.executable).with_name("nats-server"))
    store = workdir / f"store-{target_name}-{int(rate)}"
    nats = subprocess.Popen(
        [*_pin(1), nats_server, "-js", "-a", "127.0.0.1", "-p", "-1", "-sd", str(store)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    target = None
    try:
        assert nats.stderr is not None
        nats_port = int(_wait_line(nats.stderr, r"client connections on .+:(\d+)", 20).group(1))
        url = f"nats://127.0.0.1:{nats_port}"
        target = Target(target_name, url, workdir)
        pid = target.process.pid
        before = target.counts()
        cpu_before, cpu0_before, cpu1_before = _cpu_seconds(pid), _cpu_busy(0), _cpu_busy(1)
        publisher = subprocess.Popen(
            [*_pin(1), sys.executable, "-c", PUBLISHER, url, str(rate), str(duration)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        lag = 0.0
        try:
            while publisher.poll() is None:  # sample how far behind the target falls meanwhile
                lag = max(lag, target.counts()["pending"])
                time.sleep(0.1)
            out, _ = publisher.communicate(timeout=duration * 4 + 30)
        finally:
            _stop(publisher)
        if publisher.returncode != 0:
            raise RuntimeError(f"the publisher failed ({publisher.returncode})")
        published = json.loads(out)
        deadline = time.monotonic() + 60
        handled, finished, idle_since = 0.0, time.time(), time.monotonic()
        cpu = cpu0 = cpu1 = 0.0
        now = before
        while True:  # until the target has ingested everything, or all the stream still holds
            now = target.counts()
            count = now["ingested"] - before["ingested"]
            lag = max(lag, now["pending"])
            if count > handled:
                handled, finished, idle_since = count, time.time(), time.monotonic()
                cpu, cpu0 = _cpu_seconds(pid) - cpu_before, _cpu_busy(0) - cpu0_before
                cpu1 = _cpu_busy(1) - cpu1_before
            if handled >= published["sent"] or time.monotonic() > deadline:
                break
            if time.monotonic() - idle_since > 2.0:
                break  # the stream's limits discarded the rest before the target read it
            time.sleep(0.02)
        # From the first publish (the publisher's clock is this machine's) to the last ingest.
        elapsed = finished - published["began"]
        return {
            "target": target_name,
            "offered_per_s": rate,
            "published": published["sent"],
            "publisher_per_s": round(published["sent"] / published["seconds"]),
            "ingested": int(handled),
            "dropped": int(now["dropped"] - before["dropped"]),
            "discarded_unread": int(published["sent"] - handled),
            "ingest_per_s": round(handled / elapsed),
            "cpu_pct": round(100 * cpu / elapsed, 1),
            "cpu_us_per_msg": round(1e6 * cpu / max(handled, 1), 2),
            "cpu0_other_pct": round(100 * max(0.0, cpu0 - cpu) / elapsed, 1),
            # The publisher and nats-server share CPU 1: near 100 %, they limit the run.
            "cpu1_busy_pct": round(100 * cpu1 / elapsed, 1),
            "max_pending_seen": int(lag),
            "warnings": sorted(set(target.warnings)),
        }
    finally:
        if target is not None:
            _stop(target.process)
        _stop(nats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="20000,50000,70000")
    parser.add_argument("--targets", default="odin,natspy-trio,natspy-asyncio")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="odin-ingest-") as workdir:
        for repeat in range(args.repeats):
            for rate in (float(r) for r in args.rates.split(",")):
                for name in args.targets.split(","):
                    result = run(name, rate, args.duration, Path(workdir) / f"run{repeat}")
                    result["repeat"] = repeat + 1
                    results.append(result)
                    print(json.dumps(result), flush=True)
    if args.json:
        machine = {
            "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
            "kernel": os.uname().release,
        }
        args.json.write_text(json.dumps({"machine": machine, "runs": results}, indent=1))


if __name__ == "__main__":
    main()

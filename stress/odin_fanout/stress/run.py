"""A load run: start the workers, drive the publisher, watch the server, merge what comes back.

The coordinator itself sends no WebSocket traffic. It starts one ``odin_fanout.stress.worker``
process per share of the clients, reads their progress lines, samples the server (its ``/metrics``
on the same port, or ``/proc`` with ``--server-pid``), and ends the run by itself: workers
stop at the run's duration, and any still alive 60 s later are killed by PID.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs

from odin_fanout.stress.continuity import Counts
from odin_fanout.stress.histogram import Latency
from odin_fanout.stress.plan import Plan
from odin_fanout.stress.profiles import Profile
from odin_fanout.stress.worker import Tally

_METRIC = re.compile(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.MULTILINE)
_GRACE = 60.0


@attrs.define
class ServerSample:
    at: float
    rss_bytes: float | None = None
    cpu_seconds: float | None = None
    connections: float | None = None


@attrs.define
class Snapshot:
    """The whole run so far (or at its end): the workers' records merged."""

    elapsed: float = 0.0
    connected: int = 0
    sessions: int = 0
    tally: Tally = attrs.Factory(Tally)
    counts: Counts = attrs.Factory(Counts)
    latency: Latency = attrs.Factory(Latency)
    connect_time: Latency = attrs.Factory(Latency)
    loop_lag: Latency = attrs.Factory(Latency)
    close_codes: dict[str, int] = attrs.Factory(dict)
    failures: dict[str, int] = attrs.Factory(dict)
    worker_cpu_s: list[float] = attrs.Factory(list)
    server: list[ServerSample] = attrs.Factory(list)
    finished: int = 0
    """Workers that sent their result."""


def merge(records: list[dict[str, Any]], elapsed: float) -> Snapshot:
    snapshot = Snapshot(elapsed=elapsed)
    for record in records:
        snapshot.connected += record["connected"]
        snapshot.sessions += record["sessions"]
        for name, value in record["tally"].items():
            setattr(snapshot.tally, name, getattr(snapshot.tally, name) + value)
        snapshot.counts.add(Counts(**record["counts"]))
        snapshot.latency.merge(record["latency"])
        snapshot.connect_time.merge(record["connect_time"])
        snapshot.loop_lag.merge(record["loop_lag"])
        for code, n in record["close_codes"].items():
            snapshot.close_codes[code] = snapshot.close_codes.get(code, 0) + n
        for why, n in record["failures"].items():
            snapshot.failures[why] = snapshot.failures.get(why, 0) + n
        snapshot.worker_cpu_s.append(record["cpu_s"])
        snapshot.finished += record["event"] == "result"
    return snapshot


class WorkerProcess:
    def __init__(self, number: int, plan: Plan, inbox: queue.Queue[tuple[int, dict[str, Any]]]):
        self.number = number
        self.process = subprocess.Popen(
            [sys.executable, "-m", "odin_fanout.stress.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(attrs.asdict(plan)) + "\n")
        self.process.stdin.flush()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self, inbox: queue.Queue[tuple[int, dict[str, Any]]]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                inbox.put((self.number, json.loads(line)))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr = [*self.stderr[-20:], line.rstrip()]

    def stop(self) -> None:
        """End it by its PID: close its stdin (it exits), then SIGTERM, then SIGKILL."""
        process = self.process
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        for sig, wait in ((None, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if process.poll() is not None:
                return
            if sig is not None:
                process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=wait)


def sample_server(metrics_url: str | None, pid: int | None) -> ServerSample:
    sample = ServerSample(at=time.monotonic())
    if pid is not None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            import os

            sample.cpu_seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            status = Path(f"/proc/{pid}/status").read_text()
            match = re.search(r"VmRSS:\s+(\d+) kB", status)
            sample.rss_bytes = int(match.group(1)) * 1024 if match else None
    if metrics_url is not None:
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            with urllib.request.urlopen(metrics_url, timeout=2) as response:
                text = response.read().decode()
            values = {name: float(value) for name, value in _METRIC.findall(text)}
            if pid is None:
                sample.rss_bytes = values.get("process_resident_memory_bytes")
                sample.cpu_seconds = values.get("process_cpu_seconds_total")
            sample.connections = values.get("odin_connections_active")
    return sample


def drive_publisher(url: str, action: str, profile: Profile) -> str:
    """Start or stop the publisher (``odin-publisher``'s control API); its answer, briefly."""
    body: dict[str, Any] = {"action": action}
    if action == "start":
        symbols = sorted({channel.split(".")[0] for channel in profile.channels})
        events = sorted({channel.split(".")[1] for channel in profile.channels})
        body.update(messagesPerSecond=profile.publish_rate, tokens=symbols, events=events)
    request = urllib.request.Request(
        url.rstrip("/") + "/control",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(json.loads(response.read()).get("message", "ok"))
    except urllib.error.HTTPError as error:
        return f"{error.code}: {error.read()[:200].decode(errors='replace')}"
    except (OSError, urllib.error.URLError) as error:
        return f"unreachable: {error}"


def run(
    plans: list[Plan],
    profile: Profile,
    *,
    metrics_url: str | None,
    server_pid: int | None,
    publisher_url: str | None,
    on_progress: Any,
) -> tuple[Snapshot, list[str]]:
    """Run the workers to the end; the merged result and the notes worth showing."""
    notes: list[str] = []
    inbox: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    started = time.monotonic()
    workers = [WorkerProcess(n, plan, inbox) for n, plan in enumerate(plans)]
    latest: dict[int, dict[str, Any]] = {}
    samples: list[ServerSample] = []
    deadline = started + profile.duration + _GRACE
    if publisher_url and profile.publish_rate:
        notes.append(f"publisher start: {drive_publisher(publisher_url, 'start', profile)}")
    try:
        next_tick = started
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                while True:
                    number, record = inbox.get(timeout=0.1)
                    final = latest.get(number, {}).get("event") == "result"
                    if record.get("event") in ("progress", "result") and not final:
                        latest[number] = record
            if all(latest.get(w.number, {}).get("event") == "result" for w in workers):
                break
            if all(w.process.poll() is not None for w in workers) and inbox.empty():
                notes.append("workers ended without a result: " + " | ".join(
                    w.stderr[-1] if w.stderr else f"exit {w.process.returncode}"
                    for w in workers))  # fmt: skip
                break
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                samples.append(sample_server(metrics_url, server_pid))
                snapshot = merge(list(latest.values()), now - started)
                snapshot.server = samples
                on_progress(snapshot, profile)
        else:
            notes.append(f"deadline: workers still running {_GRACE:g} s after the run's end")
    finally:
        if publisher_url and profile.publish_rate:
            notes.append(f"publisher stop: {drive_publisher(publisher_url, 'stop', profile)}")
        for worker in workers:
            worker.stop()
    snapshot = merge(list(latest.values()), time.monotonic() - started)
    snapshot.server = samples
    return snapshot, notes

